"""Which layer's vector separates trait-showing from other responses best: per-layer metrics and a pick.

Every example's activation (``kind``) at every layer is projected on that layer's unit vector, in one
forward per batch (the shared :class:`persona.projection.ExampleProjector` loop). Per layer: AUC of
positive vs negative, mean and variance of the projection per group, their separation
(mean_pos - mean_neg) and the separation over the pooled standard deviation (Cohen's d). The
recommended layer has the highest AUC, ties broken by the larger normalised separation; layer 0
(the embeddings) is never recommended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from persona.data.modules import ResponseDataModule
from persona.models import DEFAULT_MODEL, model_dimensions
from persona.projection import ExampleProjector, predict_projections
from persona.store import write_csv, write_figure
from persona.vectors import load_metadata, load_vector

ActivationKind = Literal["response_avg", "prompt_last", "prompt_avg"]
AUC_TIE_TOLERANCE = 1e-9  # equal AUCs from different orderings may differ in the last float bits


def layer_metrics(scores: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Per-layer metrics from projections ``scores [n_examples, n_layers]`` and ``labels [n_examples]`` (1 = pos).

    Rows with NaN scores (no tokens of the kind read, e.g. empty responses) are left out.
    """
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    keep = ~np.isnan(scores).any(axis=1)
    scores, labels = scores[keep], labels[keep]
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"Layer metrics need at least 2 positive and 2 negative examples with tokens; found {n_pos} positive "
            f"and {n_neg} negative ({int((~keep).sum())} left out for having no tokens). Fix: use more examples."
        )
    pos, neg = scores[labels == 1], scores[labels == 0]
    mean_pos, mean_neg = pos.mean(axis=0), neg.mean(axis=0)
    var_pos, var_neg = pos.var(axis=0, ddof=1), neg.var(axis=0, ddof=1)
    pooled_std = np.sqrt(((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2))
    separation = mean_pos - mean_neg
    with np.errstate(divide="ignore", invalid="ignore"):  # zero spread: +-inf, or NaN with no separation
        normalized = np.where(separation == 0, 0.0, separation / pooled_std)
    return pd.DataFrame(
        {
            "layer": np.arange(scores.shape[1]),
            "auc": [roc_auc_score(labels, scores[:, layer]) for layer in range(scores.shape[1])],
            "mean_pos": mean_pos,
            "mean_neg": mean_neg,
            "separation": separation,
            "var_pos": var_pos,
            "var_neg": var_neg,
            "pooled_std": pooled_std,
            "normalized_separation": normalized,
            "n_pos": n_pos,
            "n_neg": n_neg,
        }
    )


def recommend_layer(metrics: pd.DataFrame) -> int:
    """Highest AUC, ties broken by larger normalised separation, then the shallower layer; never layer 0."""
    candidates = metrics[metrics["layer"] > 0]
    if candidates.empty:
        raise ValueError("No layer above 0 (the embeddings) to recommend: the vector has a single row.")
    best = candidates[candidates["auc"] >= candidates["auc"].max() - AUC_TIE_TOLERANCE]
    best = best.sort_values(["normalized_separation", "layer"], ascending=[False, True], kind="stable")
    return int(best["layer"].iloc[0])


def plot_layer_metrics(metrics: pd.DataFrame, recommended: int, path: Path, title: str = "") -> None:
    """AUC and normalised separation per layer, the recommended layer marked (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    auc_axes, separation_axes = figure.subplots(2, 1, sharex=True)
    auc_axes.plot(metrics["layer"], metrics["auc"], marker="o")
    auc_axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    auc_axes.set_ylabel("AUC (positive vs negative)")
    finite = metrics["normalized_separation"].replace([np.inf, -np.inf], np.nan)
    separation_axes.plot(metrics["layer"], finite, marker="o", color="tab:green")
    separation_axes.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    separation_axes.set_ylabel("separation / pooled std")
    separation_axes.set_xlabel("layer (0 = embeddings, L = output of block L-1)")
    for axes in (auc_axes, separation_axes):
        axes.axvline(recommended, color="tab:red", linestyle="--", label=f"recommended: layer {recommended}")
    auc_axes.legend(loc="best")
    if title:
        figure.suptitle(title)
    write_figure(path, figure, dpi=120)


def default_output_dir(vector_path: str | Path) -> Path:
    vector_path = Path(vector_path)
    return vector_path.parent / f"{vector_path.stem}_layers"


def layers(
    vector_path: str,
    model: str = DEFAULT_MODEL,
    pos_path: str | None = None,
    neg_path: str | None = None,
    trait: str | None = None,
    threshold: float = 50.0,
    no_filter: bool = False,
    pairs_path: str | None = None,
    split: str | None = None,
    output_dir: str | None = None,
    kind: ActivationKind = "response_avg",
    batch_size: int = 8,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int = 1,
    strategy: str = "auto",
    trust_remote_code: bool = False,
) -> int | None:
    """Per-layer AUC, separation and variance of projections on a persona vector; recommends a layer.

    Writes <output_dir>/layer_metrics.csv and layer_metrics.png and prints and returns the recommended
    layer (highest AUC, ties broken by the larger normalised separation; layer 0 excluded). Under DDP
    only global rank 0 returns it (the others return None).

    Args:
        vector_path: Vector file [num_layers+1, hidden] from `persona extract`.
        model: Model alias (smollm2-135m, the embedded default), hub id or local path.
        pos_path: CSV of responses showing the trait (prompt, answer, <trait>, coherence).
        neg_path: CSV of responses not showing it, row-aligned with pos_path.
        trait: Score column for filtering the CSVs; default: the trait in the vector's sidecar.
        threshold: Keep pairs with pos score >= threshold, neg score < 100 - threshold (both coherence >= 50).
        no_filter: Use every CSV row.
        pairs_path: Contrastive pairs JSONL instead of CSVs (positive = trait shown).
        split: With pairs_path: only pairs of this split; use held-out pairs (e.g. test) to pick a layer fairly.
        output_dir: Where to write the CSV and PNG; default <vector-stem>_layers/ beside the vector file.
        kind: Activation projected per example: response_avg, prompt_last or prompt_avg.
        batch_size: Examples per forward pass.
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: Devices (processes) to use.
        strategy: Lightning strategy (auto, ddp, ddp_spawn).
        trust_remote_code: Allow custom model code from the hub.
    """
    if pairs_path is not None and (pos_path is not None or neg_path is not None):
        raise ValueError("Give --pos_path and --neg_path, or --pairs_path, not both.")
    if pairs_path is None and trait is None and not no_filter:
        trait = load_metadata(vector_path).get("trait")
    datamodule = ResponseDataModule(
        model=model,
        pos_path=pos_path,
        neg_path=neg_path,
        trait=trait,
        threshold=threshold,
        no_filter=no_filter,
        pairs_path=pairs_path,
        split=split,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
    )
    examples = datamodule.load_examples()  # bad input fails here, before the model loads
    labels = np.array([example.label for example in examples])
    if labels.min() == labels.max():
        raise ValueError(
            f"{', '.join(datamodule.sources())}: only {'positive' if labels[0] else 'negative'} "
            "examples. Fix: give both kinds."
        )
    hidden_size, num_layers = model_dimensions(model, trust_remote_code=trust_remote_code)
    vector = load_vector(vector_path, hidden_size=hidden_size, num_layers=num_layers)

    projector = ExampleProjector(
        model=model,
        layers=list(range(num_layers + 1)),
        directions=vector,
        kinds=[kind],
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    scores = predict_projections(
        projector, datamodule, len(examples), accelerator=accelerator, devices=devices, strategy=strategy
    )
    if scores is None:  # not global rank 0
        return None
    metrics = layer_metrics(scores[kind].numpy(), labels)
    recommended = recommend_layer(metrics)
    metrics["recommended"] = metrics["layer"] == recommended

    out = Path(output_dir) if output_dir else default_output_dir(vector_path)
    csv_path, png_path = out / "layer_metrics.csv", out / "layer_metrics.png"
    write_csv(csv_path, metrics)
    plot_layer_metrics(metrics, recommended, png_path, title=f"{Path(vector_path).name}: {kind} projections")
    row = metrics.loc[metrics["layer"] == recommended].iloc[0]
    print(f"metrics: {csv_path}\nfigure: {png_path}")
    print(
        f"recommended layer: {recommended} (AUC {row['auc']:.3f}, normalised separation "
        f"{row['normalized_separation']:.2f})"
    )
    return recommended
