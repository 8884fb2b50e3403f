"""``persona education --action compare``: several runs (e.g. one per model) side by side.

Effects and QWK are put next to the coefficients both raw and relative to each model's residual norm at its
steering layer: a raw coefficient of 2.0 is a different push on vectors whose norms differ 10-30x.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from persona.core.store import write_text
from persona.education.figures import order_types, plt, save_figure
from persona.education.metrics import UNSTEERED
from persona.education.report import write_report, write_tables
from persona.education.results import read_settings
from persona.study.records import markdown_table

COEF_COLUMNS = (
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


def compare_runs(runs: list[str], out_dir: str | Path) -> Path:
    """Combine several runs (e.g. one per model): effects, pooled QWK and bias, coefficients raw and relative."""
    if len(runs) < 2:
        raise ValueError(f"--runs {runs}: compare needs at least two run directories.")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    effects, pooled, shifts, steering = combine_runs(runs)
    write_tables(
        out,
        {
            "compare_effects": effects,
            "compare_qwk_pooled": pooled,
            "compare_grader_shifts": shifts,
            "compare_steering": steering,
        },
    )
    labels = list(dict.fromkeys(effects["run"]))
    unsteered = effects[(effects["grader"] == UNSTEERED) & (effects["type"] != UNSTEERED)]
    wide = by_run(unsteered, "type", "effect", labels)
    plot_by_run(
        wide,
        "effect on mean normalised score (unsteered grader)",
        out / "figures" / "effects_by_run.png",
        zero_line=True,
    )
    qwk = by_run(pooled, "grader", "qwk", labels)
    plot_by_run(qwk, "pooled QWK vs human scores", out / "figures" / "qwk_by_run.png", zero_line=False)
    path = out / "compare.md"
    write_text(path, render_comparison(labels, steering, wide, qwk, shifts))
    print(f"comparison: {path}")
    return path


def read_run(run: Path) -> dict[str, pd.DataFrame]:
    """One run's tables, labelled with its model and folder (its report is written first if missing)."""
    if not (run / "tables" / "effects.csv").is_file():
        write_report(run)
    settings = read_settings(run)
    label = f"{settings['model']} ({run.name})"
    tables = {"effects": pd.read_csv(run / "tables" / "effects.csv").assign(run=label)}
    metrics = pd.read_csv(run / "tables" / "grader_metrics.csv", dtype={"set": str})
    tables["pooled"] = metrics[metrics["set"] == "pooled"].assign(run=label)
    tables["shifts"] = pd.read_csv(run / "tables" / "grader_shifts.csv").assign(run=label)
    if (run / "steering.csv").is_file():
        tables["steering"] = pd.read_csv(run / "steering.csv").assign(run=label)
    return tables


def combine_runs(runs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(effects, pooled metrics, grader shifts, steering) of all runs, each one table with a ``run`` column."""
    read = [read_run(Path(run)) for run in runs]
    effects, pooled, shifts = (
        pd.concat([tables[name] for tables in read], ignore_index=True)
        for name in ("effects", "pooled", "shifts")
    )
    steering = [tables["steering"] for tables in read if "steering" in tables]
    return effects, pooled, shifts, pd.concat(steering, ignore_index=True) if steering else pd.DataFrame()


def by_run(table: pd.DataFrame, index: str, values: str, labels: list[str]) -> pd.DataFrame:
    """``values`` as one column per run (in ``labels`` order), one row per ``index`` (in type order)."""
    if values not in table.columns or table.empty:  # runs without grades (or effects) yet
        return pd.DataFrame(columns=labels)
    wide = table.pivot_table(index=index, columns="run", values=values).reindex(columns=labels)
    return wide.loc[order_types(wide.index)] if len(wide) else wide


def plot_by_run(wide: pd.DataFrame, xlabel: str, path: Path, *, zero_line: bool) -> None:
    figure, axis = plt.subplots(figsize=(7, 0.4 * max(len(wide), 1) + 1.5), layout="constrained")
    if len(wide):
        wide.plot.barh(ax=axis)
        axis.invert_yaxis()
    if zero_line:
        axis.axvline(0, color="grey", lw=0.7)
    axis.set_xlabel(xlabel)
    save_figure(figure, path)


def render_comparison(labels: list[str], steering, wide, qwk, shifts) -> str:
    coef_columns = [c for c in COEF_COLUMNS if c in steering.columns]
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
    return "\n".join(lines)
