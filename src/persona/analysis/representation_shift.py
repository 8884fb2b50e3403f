"""How fine-tuning reshapes a trait's representation: the base model's vector and layer metrics against the
fine-tuned model's, per layer, on the same held-out examples.

Per layer: the cosine between the two vectors, the ratio of their norms (fine-tuned / base), and AUC, separation
(mean difference and over the pooled standard deviation) and the within-group variances in both models; the
recommended layer before and after, and the layers where each model encodes the trait (AUC >= a threshold).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from persona.analysis.layers import recommend_layer
from persona.core.store import write_figure

COMPARED = ("auc", "separation", "normalized_separation", "var_pos", "var_neg")
ENCODED_AUC = 0.9  # a layer "encodes" the trait when its held-out AUC reaches this


def representation_shift(
    base_vector: np.ndarray, tuned_vector: np.ndarray, base_metrics: pd.DataFrame, tuned_metrics: pd.DataFrame
) -> pd.DataFrame:
    """One row per layer: cosine and norm ratio of the vectors ``[layers+1, hidden]``, and each metric in both
    models (``<metric>_base``, ``<metric>_tuned``). The vectors must have the same shape."""
    if base_vector.shape != tuned_vector.shape:
        raise ValueError(
            f"The two vectors have shapes {base_vector.shape} and {tuned_vector.shape}: they are not of one model "
            "and its fine-tuned version. Fix: compare vectors of the adapter's own base model."
        )
    base, tuned = base_vector.astype(np.float64), tuned_vector.astype(np.float64)
    base_norm, tuned_norm = np.linalg.norm(base, axis=1), np.linalg.norm(tuned, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = (base * tuned).sum(axis=1) / (base_norm * tuned_norm)
        ratio = tuned_norm / base_norm
    table = pd.DataFrame({"layer": np.arange(len(base)), "cosine": cosine, "norm_ratio": ratio})
    for metric in COMPARED:
        table[f"{metric}_base"] = base_metrics[metric].to_numpy()
        table[f"{metric}_tuned"] = tuned_metrics[metric].to_numpy()
    return table


def summarise(table: pd.DataFrame) -> dict:
    """The recommended layer and the encoding layers before and after, and the mean cosine over layers 1..L."""

    def side(suffix: str) -> dict:
        metrics = table.rename(columns={f"{m}_{suffix}": m for m in COMPARED})
        encoded = metrics.loc[(metrics["layer"] > 0) & (metrics["auc"] >= ENCODED_AUC), "layer"].tolist()
        return {"recommended": recommend_layer(metrics), "encoded_layers": encoded}

    body = table[table["layer"] > 0]
    return {
        "base": side("base"),
        "tuned": side("tuned"),
        "mean_cosine": float(body["cosine"].mean()),
        "min_cosine_layer": int(body.loc[body["cosine"].idxmin(), "layer"]),
    }


def plot_representation_shift(table: pd.DataFrame, summary: dict, path: Path, title: str = "") -> None:
    """Three panels over layers: AUC and normalised separation of both models, and cosine / norm ratio."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    auc_axes, separation_axes, vector_axes = figure.subplots(3, 1, sharex=True)
    for suffix, label, color in (("base", "base model", "tab:blue"), ("tuned", "fine-tuned", "tab:red")):
        recommended = summary[suffix]["recommended"]
        auc_axes.plot(
            table["layer"],
            table[f"auc_{suffix}"],
            marker="o",
            color=color,
            label=f"{label} (best {recommended})",
        )
        finite = table[f"normalized_separation_{suffix}"].replace([np.inf, -np.inf], np.nan)
        separation_axes.plot(table["layer"], finite, marker="o", color=color, label=label)
        for axes in (auc_axes, separation_axes):
            axes.axvline(recommended, color=color, linestyle="--", linewidth=1)
    auc_axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    auc_axes.set_ylabel("AUC (positive vs negative)")
    auc_axes.legend(loc="best")
    separation_axes.set_ylabel("separation / pooled std")
    vector_axes.plot(table["layer"], table["cosine"], marker="o", color="tab:purple")
    vector_axes.set_ylim(-1.05, 1.05)
    vector_axes.set_ylabel("cosine of the vectors", color="tab:purple")
    vector_axes.set_xlabel("layer (0 = embeddings, L = output of block L-1)")
    ratio_axes = vector_axes.twinx()  # norms can differ by orders of magnitude: their own log axis
    ratio_axes.plot(table["layer"], table["norm_ratio"], marker="s", color="tab:orange")
    ratio_axes.set_yscale("log")
    ratio_axes.axhline(1.0, color="tab:orange", linestyle=":", linewidth=1)
    ratio_axes.set_ylabel("norm tuned / base", color="tab:orange")
    if title:
        figure.suptitle(title)
    write_figure(path, figure, dpi=120)


def vector_quality(table: pd.DataFrame, threshold: float = ENCODED_AUC) -> pd.DataFrame:
    """The second seed's table, base and fine-tuned: over the layers that encode the trait (held-out AUC >=
    ``threshold``, layer 0 excluded), the AUC range, the normalised-separation range and which layers they are."""
    rows = []
    for suffix, label in (("base", "base model"), ("tuned", "fine-tuned")):
        body = table[table["layer"] > 0]
        encoded = body[body[f"auc_{suffix}"] >= threshold]
        if encoded.empty:
            best = body.loc[body[f"auc_{suffix}"].idxmax()]
            rows.append({"model": label, "auc_range": f"none >= {threshold:g} (best {best[f'auc_{suffix}']:.2f} at layer "
                         f"{int(best['layer'])})", "separation_range": "", "layers": "", "n_layers": 0})  # fmt: skip
            continue
        auc, separation = encoded[f"auc_{suffix}"], encoded[f"normalized_separation_{suffix}"]
        layers = encoded["layer"].astype(int).tolist()
        rows.append(
            {
                "model": label,
                "auc_range": f"{auc.min():.2f}–{auc.max():.2f}",
                "separation_range": f"{separation.min():.2f}–{separation.max():.2f}",
                "layers": f"{layers[0]}–{layers[-1]}" if len(layers) > 1 else str(layers[0]),
                "n_layers": len(layers),
            }
        )
    return pd.DataFrame(rows)
