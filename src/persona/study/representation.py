"""The fine-tuning study's representation shift: the trait re-extracted on every trained adapter (train pairs)
and read on the held-out pairs, against the base model's vector and layer metrics. One base is loaded and the
adapters are swapped on it in turn, as the finetuning shift does."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from persona.core.store import write_csv, write_figure
from persona.study.runs import trait_share


def representation_study(
    phase_dir: Path,
    adapters: dict[str, str],
    *,
    model: str,
    trait: str,
    pairs_path: Path,
    base_vector_path: str,
    base_metrics_csv: str,
    hardware,
    batch_size: int = 8,
) -> dict:
    """``adapters``: run name -> adapter directory. Writes ``representation/<run>/`` (vectors and the per-layer
    table), ``representation_by_run.csv`` and ``representation.png``; returns their paths and the table."""
    from persona.analysis.representation_shift import representation_shift, summarise
    from persona.analysis.shift import finetuned_models
    from persona.commands.layers import projection_metrics
    from persona.core.hardware import make_trainer, resolve_device
    from persona.data.modules import ResponseDataModule
    from persona.models import load_model
    from persona.vectors import load_vector
    from persona.vectors.extraction import VectorExtractor

    out = phase_dir / "representation"
    base_vector = load_vector(base_vector_path).numpy()
    base_metrics = pd.read_csv(base_metrics_csv)
    base = load_model(model, dtype=hardware.dtype, device=resolve_device(hardware.accelerator))
    runs = {path: name for name, path in adapters.items()}
    rows, tables = [], {}
    for path, net in finetuned_models(base, model, list(adapters.values())):
        run = runs[path]
        # No neutral-text pass: these vectors are compared, not capped with (a `neutral:` bound measures it then).
        extractor = VectorExtractor(
            model=path,
            trait=trait,
            save_dir=str(out / run),
            dtype=hardware.dtype,
            module=net,
            record_neutral=False,
        )
        train = ResponseDataModule(
            model=path, pairs_path=str(pairs_path), split="train", batch_size=batch_size
        )
        make_trainer(hardware.accelerator).predict(extractor, datamodule=train, return_predictions=False)
        tuned = extractor.vectors["response_avg"].numpy()
        metrics = projection_metrics(
            path, tuned, {"pairs_path": str(pairs_path), "split": "test", "batch_size": batch_size},
            kind="response_avg", module=net, dtype=hardware.dtype, accelerator=hardware.accelerator, devices=1,
            strategy="auto",
        )  # fmt: skip
        table = tables[run] = representation_shift(base_vector, tuned, base_metrics, metrics)
        write_csv(out / run / "representation_shift.csv", table)
        rows.append(run_row(run, table, summarise(table)))
    frame = pd.DataFrame(rows)
    write_csv(phase_dir / "representation_by_run.csv", frame)
    plot_runs(tables, phase_dir / "representation.png", trait)
    return {
        "csv": str(phase_dir / "representation_by_run.csv"),
        "png": str(phase_dir / "representation.png"),
        "table": frame.to_dict("records"),
    }


def run_row(run: str, table: pd.DataFrame, summary: dict) -> dict:
    """One run's line: vector similarity, the best layer before and after, and the AUC and separation ranges
    over layers 1..L in the fine-tuned model (the second seed's table), with the base model's beside them."""
    body = table[table["layer"] > 0]
    base_layer = summary["base"]["recommended"]
    at_base = table.loc[table["layer"] == base_layer].iloc[0]
    return {
        "run": run,
        "trait_share": trait_share(run),
        "mean_cosine": summary["mean_cosine"],
        "recommended_base": base_layer,
        "recommended_tuned": summary["tuned"]["recommended"],
        "auc_at_base_layer_base": float(at_base["auc_base"]),
        "auc_at_base_layer_tuned": float(at_base["auc_tuned"]),
        "auc_range_tuned": f"{body['auc_tuned'].min():.2f}–{body['auc_tuned'].max():.2f}",
        "separation_range_tuned": range_text(body["normalized_separation_tuned"]),
        "separation_range_base": range_text(body["normalized_separation_base"]),
        "encoded_layers_base": len(summary["base"]["encoded_layers"]),
        "encoded_layers_tuned": len(summary["tuned"]["encoded_layers"]),
    }


def range_text(values: pd.Series) -> str:
    return f"{values.min():.2f}–{values.max():.2f}"


def plot_runs(tables: dict[str, pd.DataFrame], path: Path, trait: str) -> None:
    """Per layer, every run: the cosine of its vector with the base's, and its held-out AUC (base dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 6), layout="constrained")
    FigureCanvasAgg(figure)
    cosine_axes, auc_axes = figure.subplots(2, 1, sharex=True)
    for run, table in tables.items():
        cosine_axes.plot(table["layer"], table["cosine"], marker=".", label=run)
        auc_axes.plot(table["layer"], table["auc_tuned"], marker=".", label=run)
    if tables:
        first = next(iter(tables.values()))
        auc_axes.plot(first["layer"], first["auc_base"], color="black", linestyle="--", label="base model")
    cosine_axes.set_ylabel("cosine with the base's vector")
    lowest = min((float(t["cosine"].min()) for t in tables.values()), default=-1.0)
    cosine_axes.set_ylim(max(-1.05, lowest - 0.05), 1.01)  # the spread, not the whole [-1, 1]
    auc_axes.set_ylabel("held-out AUC")
    auc_axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    auc_axes.set_xlabel("layer (0 = embeddings, L = output of block L-1)")
    cosine_axes.legend(loc="best", fontsize=7)
    figure.suptitle(f"{trait}: the trait's representation after each fine-tuning run")
    write_figure(path, figure, dpi=120)
