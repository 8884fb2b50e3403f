"""Which layer's vector separates trait-showing from other responses best: per-layer metrics and a pick.

Every example's activation (``kind``) at every layer is projected on that layer's unit vector, in one
forward per batch (the shared :class:`persona.vectors.projection.ExampleProjector` loop). Per layer: AUC of
positive vs negative, mean and variance of the projection per group, their separation
(mean_pos - mean_neg) and the separation over the pooled standard deviation (Cohen's d). The
recommended layer has the highest AUC, ties broken by the larger normalised separation; layer 0
(the embeddings) is never recommended.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from persona.core.store import write_figure

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
