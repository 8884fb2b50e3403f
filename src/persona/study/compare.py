"""`persona report compare`: studies of different models (or settings) side by side, tables and figures.

The research code compares models trait by trait; here each study's ``results.json`` gives one row per
(study, trait), and each trait's ``layer_metrics.csv`` gives a curve of held-out AUC against relative depth
(layer / number of layers), so models of different depths share one axis.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from persona.core import checks
from persona.core.errors import PersonaError
from persona.core.store import write_csv, write_figure, write_text
from persona.study.records import markdown_table
from persona.study.results import read_results


def study_rows(run: Path) -> list[dict]:
    results = read_results(run)
    model = results["model"]["model"]
    depth = results["model"]["layers"]
    finetune = results.get("finetune") or {}
    rows = []
    for trait, r in results["traits"].items():
        layers, sweep, judged = r.get("layers", {}), r.get("sweep", {}), r.get("judged_sweep") or {}
        recommended = layers.get("recommended")
        rows.append(
            {
                "study": run.name,
                "model": model,
                "trait": trait,
                "layers": depth,
                "recommended_layer": recommended,
                "relative_depth": None if recommended is None else recommended / depth,
                "heldout_auc": layers.get("auc"),
                "likelihood_effect": sweep.get("effect"),
                "judged_effect": judged.get("effect"),
                "shift_r": finetune.get("correlation", {}).get("r") if trait == results["trait"] else None,
                "screen_auc": finetune.get("screen_auc") if trait == results["trait"] else None,
                "metrics_csv": layers.get("csv"),
            }
        )
    return rows


PRODUCES = ("compare.csv", "compare.md", "auc_by_depth.png", "auc_by_trait.png")


def compare_studies(runs: list[str], output_dir: str, *, overwrite: bool = False) -> Path:
    if len(runs) < 2:
        raise PersonaError(
            f"--runs {runs}: compare needs at least two study run directories. Fix: --runs A,B."
        )
    missing = [run for run in runs if not (Path(run) / "results.json").is_file()]
    if missing:
        raise PersonaError(
            f"--runs: {', '.join(missing)} has no results.json. Fix: point at directories `persona study` wrote."
        )
    for run in runs:
        read_results(Path(run))  # every file checked before anything is written
    inputs = {f"--runs {run}": Path(run) / "results.json" for run in runs}
    out = checks.output_dir(output_dir, "--output_dir", produces=PRODUCES, overwrite=overwrite, inputs=inputs)
    table = pd.DataFrame([row for run in runs for row in study_rows(Path(run))])
    write_csv(out / "compare.csv", table.drop(columns=["metrics_csv"]))
    plot_depth_curves(table, out / "auc_by_depth.png")
    plot_auc_bars(table, out / "auc_by_trait.png")
    lines = [
        "# Studies compared",
        "",
        markdown_table(table.drop(columns=["metrics_csv"])),
        "",
        "Held-out AUC along relative depth (layer / number of layers), one line per study and trait:",
        "",
        "![AUC by depth](auc_by_depth.png)",
        "",
        "![AUC by trait](auc_by_trait.png)",
        "",
    ]
    path = write_text(out / "compare.md", "\n".join(lines))
    print(f"comparison: {path}")
    return path


def plot_depth_curves(table: pd.DataFrame, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for row in table.itertuples(index=False):
        if row.metrics_csv and Path(row.metrics_csv).is_file():
            metrics = pd.read_csv(row.metrics_csv)
            axes.plot(metrics["layer"] / row.layers, metrics["auc"], label=f"{row.model}: {row.trait}")
    axes.set_xlabel("relative depth (layer / number of layers)")
    axes.set_ylabel("held-out AUC")
    axes.legend(fontsize=7)
    write_figure(path, figure)


def plot_auc_bars(table: pd.DataFrame, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pivot = table.pivot_table(index="trait", columns="model", values="heldout_auc")
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    pivot.plot.bar(ax=axes)
    axes.set_ylabel("held-out AUC at the recommended layer")
    axes.set_ylim(0, 1.05)
    write_figure(path, figure)
