"""``persona education --action compare``: several runs (e.g. one per model) side by side.

Effects and QWK are put next to the coefficients both raw and relative to each model's residual norm at its
steering layer: a raw coefficient of 2.0 is a different push on vectors whose norms differ 10-30x.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from persona.education.figures import order_types, plt, save_figure
from persona.education.metrics import UNSTEERED
from persona.education.report import write_report
from persona.report import markdown_table
from persona.store import atomic_write, write_csv


def compare_runs(runs: list[str], out_dir: str | Path) -> Path:
    """Combine several runs (e.g. one per model): effects, pooled QWK and bias, coefficients raw and relative."""
    if len(runs) < 2:
        raise ValueError(f"--runs {runs}: compare needs at least two run directories.")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    effects, pooled, shifts, steering = [], [], [], []
    for run in runs:
        run = Path(run)
        if not (run / "tables" / "effects.csv").is_file():
            write_report(run)
        settings = json.loads((run / "settings.json").read_text())
        label = f"{settings['model']} ({run.name})"
        effects.append(pd.read_csv(run / "tables" / "effects.csv").assign(run=label))
        metrics = pd.read_csv(run / "tables" / "grader_metrics.csv", dtype={"set": str})
        pooled.append(metrics[metrics["set"] == "pooled"].assign(run=label))
        shifts.append(pd.read_csv(run / "tables" / "grader_shifts.csv").assign(run=label))
        if (run / "steering.csv").is_file():
            steering.append(pd.read_csv(run / "steering.csv").assign(run=label))
    effects, pooled = pd.concat(effects, ignore_index=True), pd.concat(pooled, ignore_index=True)
    shifts = pd.concat(shifts, ignore_index=True)
    steering = pd.concat(steering, ignore_index=True) if steering else pd.DataFrame()
    for name, table in (
        ("effects", effects),
        ("qwk_pooled", pooled),
        ("grader_shifts", shifts),
        ("steering", steering),
    ):
        write_csv(out / f"compare_{name}.csv", table)

    labels = list(dict.fromkeys(effects["run"]))
    unsteered = effects[(effects["grader"] == UNSTEERED) & (effects["type"] != UNSTEERED)]
    wide = unsteered.pivot_table(index="type", columns="run", values="effect").reindex(columns=labels)
    wide = wide.loc[order_types(wide.index)] if len(wide) else wide
    figure, axis = plt.subplots(figsize=(7, 0.4 * max(len(wide), 1) + 1.5), layout="constrained")
    if len(wide):
        wide.plot.barh(ax=axis)
        axis.invert_yaxis()
    axis.axvline(0, color="grey", lw=0.7)
    axis.set_xlabel("effect on mean normalised score (unsteered grader)")
    save_figure(figure, out / "figures" / "effects_by_run.png")
    qwk = pooled.pivot_table(index="grader", columns="run", values="qwk").reindex(columns=labels)
    qwk = qwk.loc[order_types(qwk.index)] if len(qwk) else qwk
    figure, axis = plt.subplots(figsize=(7, 0.4 * max(len(qwk), 1) + 1.5), layout="constrained")
    if len(qwk):
        qwk.plot.barh(ax=axis)
        axis.invert_yaxis()
    axis.set_xlabel("pooled QWK vs human scores")
    save_figure(figure, out / "figures" / "qwk_by_run.png")

    coef_columns = [
        c
        for c in (
            "run",
            "trait",
            "route",
            "layer",
            "vector_norm",
            "residual_norm",
            "student_coef_raw",
            "student_coef_relative",
            "grader_coef_raw",
            "grader_coef_relative",
        )
        if c in steering.columns
    ]
    lines = [
        "# ASAP-SAS study: comparison of runs",
        "",
        *[f"- {label}" for label in labels],
        "",
        "## Coefficients, raw and relative to each model's residual norm at its steering layer",
        "",
        "A raw coefficient means different pushes on different models (vector norms differ by an order of "
        "magnitude); compare effects at similar *relative* coefficients.",
        "",
        markdown_table(steering[coef_columns]) if len(steering) else "(no steering tables)",
        "",
        "## Effects of student types (unsteered grader)",
        "",
        markdown_table(wide.reset_index()) if len(wide) else "(none)",
        "",
        "![effects by run](figures/effects_by_run.png)",
        "",
        "## Pooled QWK per grader",
        "",
        markdown_table(qwk.reset_index()) if len(qwk) else "(none)",
        "",
        "![QWK by run](figures/qwk_by_run.png)",
        "",
        "## Grader bias and its change vs the unsteered grader",
        "",
        markdown_table(shifts[["run", "grader", "n_paired", "bias", "delta_bias", "qwk", "delta_qwk"]]),
        "",
        "Tables: `compare_effects.csv`, `compare_qwk_pooled.csv`, `compare_grader_shifts.csv`, "
        "`compare_steering.csv`.",
        "",
    ]
    path = out / "compare.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))
    print(f"comparison: {path}")
    return path
