"""The figures of an education study report: effects, score distributions, grader metrics, heatmap, length."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from persona.core.store import write_figure  # noqa: E402
from persona.education.metrics import UNSTEERED  # noqa: E402


def save_figure(figure, path: Path) -> None:
    """PNG, atomically. Figures use the constrained layout, so no second "tight" layout pass is needed."""
    write_figure(path, figure, dpi=110)
    plt.close(figure)


def order_types(types) -> list[str]:
    types = list(dict.fromkeys(types))
    return sorted(types, key=lambda t: (t != UNSTEERED, t.rstrip("+-"), t.endswith("-")))


# ------------------------------------------------------------------------------------------------ figures


def plot_effects(effects: pd.DataFrame, path: Path) -> None:
    """One panel per non-steered grader (local unsteered, API); the heat-map covers the steered graders."""
    graders = [g for g in dict.fromkeys(effects["grader"]) if g == UNSTEERED or g.startswith("api:")]
    count = effects["type"].nunique()
    figure, axes = plt.subplots(
        1, len(graders), figsize=(5.5 * len(graders), 0.4 * count + 1.5), squeeze=False, layout="constrained"
    )
    for axis, grader in zip(axes[0], graders, strict=True):
        part = effects[(effects["grader"] == grader) & (effects["type"] != UNSTEERED)]
        part = part.set_index("type").loc[order_types(part["type"])]
        low = (part["effect"] - part["ci_low"]).clip(lower=0).fillna(0)
        high = (part["ci_high"] - part["effect"]).clip(lower=0).fillna(0)
        colors = ["tab:red" if t.endswith("+") else "tab:blue" for t in part.index]
        axis.barh(part.index, part["effect"], xerr=[low, high], color=colors, capsize=3)
        axis.axvline(0, color="grey", lw=0.7)
        axis.invert_yaxis()
        axis.set_xlabel("mean normalised score − unsteered student\n(0–1 scale, 95% paired bootstrap CI)")
        axis.set_title(f"students steered +/−, graded by: {grader}")
    save_figure(figure, path)


def plot_distributions(a_scores: pd.DataFrame, b_counts: pd.DataFrame, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    types = order_types(a_scores["type"]) if len(a_scores) else []
    data = [a_scores.loc[a_scores["type"] == t, "normalised"].dropna().to_numpy() for t in types]
    if types:
        left.boxplot(data, tick_labels=types, vert=False)
        left.invert_yaxis()
    left.set_xlabel("normalised score (unsteered grader)")
    left.set_title("A: student answers")
    if len(b_counts):
        wide = b_counts.pivot_table(index="who", columns="score", values="share", fill_value=0)
        wide = wide.loc[["human"] + order_types(w for w in wide.index if w != "human")]
        wide.plot.barh(stacked=True, ax=right, colormap="viridis", width=0.8)
        right.invert_yaxis()
        right.set_ylabel("")
        right.legend(title="score", fontsize=8, loc="lower right")
    right.set_xlabel("share of real answers")
    right.set_title("B: scores given to real answers")
    save_figure(figure, path)


def plot_grader_metrics(shifts: pd.DataFrame, pooled: pd.DataFrame, path: Path) -> None:
    order = order_types(pooled["grader"])
    pooled = pooled.set_index("grader").loc[order]
    shifts = shifts.set_index("grader").reindex(order)
    figure, axes = plt.subplots(
        1, 4, figsize=(15, 0.35 * len(order) + 1.8), sharey=True, layout="constrained"
    )
    panels = (
        (pooled["qwk"], None, "pooled QWK vs humans"),
        (shifts["delta_qwk"], "delta_qwk", "QWK − unsteered grader's\n(95% paired bootstrap CI)"),
        (pooled["bias"], None, "bias: grader − human\n(raw expected score)"),
        (shifts["delta_bias"], "delta_bias", "bias − unsteered grader's\n(95% paired bootstrap CI)"),
    )
    for axis, (values, delta, label) in zip(axes, panels, strict=True):
        errors = None
        if delta is not None:
            errors = [
                (shifts[delta] - shifts[f"{delta}_ci_low"]).clip(lower=0).fillna(0),
                (shifts[f"{delta}_ci_high"] - shifts[delta]).clip(lower=0).fillna(0),
            ]
        axis.barh(order, values.fillna(0), xerr=errors, capsize=3, color="tab:gray")
        axis.axvline(0, color="black", lw=0.6)
        axis.set_xlabel(label)
    axes[0].invert_yaxis()
    save_figure(figure, path)


def plot_heatmap(wide: pd.DataFrame, path: Path) -> None:
    figure, axis = plt.subplots(
        figsize=(0.8 * wide.shape[1] + 3, 0.4 * wide.shape[0] + 1.5), layout="constrained"
    )
    image = axis.imshow(wide.to_numpy(float), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(wide.shape[1]), wide.columns, rotation=45, ha="right")
    axis.set_yticks(range(wide.shape[0]), wide.index)
    for (i, j), value in np.ndenumerate(wide.to_numpy(float)):
        if math.isfinite(value):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    axis.set_xlabel("grader")
    axis.set_ylabel("student")
    figure.colorbar(image, ax=axis, label="mean normalised score")
    save_figure(figure, path)


def plot_length(scores: pd.DataFrame, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4), layout="constrained")
    for student in order_types(scores["type"]):
        part = scores[scores["type"] == student]
        axis.scatter(part["words"], part["normalised"], s=14, label=student, alpha=0.8)
    axis.set_xlabel("answer length (words)")
    axis.set_ylabel("normalised score (unsteered grader)")
    if len(scores):
        axis.legend(fontsize=7, ncol=2)
    save_figure(figure, path)


# ------------------------------------------------------------------------------------------------ tables
