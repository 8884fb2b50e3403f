"""How much persona vectors overlap: per-layer cosines between every pair of vector files, as a CSV and a heatmap.

Several traits steered at once add up, overlap included; this says how much one trait's push moves another's
direction before anyone composes them (``orthogonalise=True`` in :func:`persona.steering.steer` removes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from persona.core.store import write_csv, write_figure
from persona.vectors.files import read_vector_file


def _name(path: str | Path) -> str:
    return Path(path).name.split(".")[0]  # as in projection column names: cut at the first dot


def overlap_table(vector_paths: Sequence[str | Path], names: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows ``(layer, a, b, cosine)`` for every layer and pair ``a < b`` in the order given; NaN where a row is zero.

    Every file must have the same shape ``[num_layers + 1, hidden]`` (vectors of one model).
    """
    if len(vector_paths) < 2:
        raise ValueError(
            f"overlap needs at least 2 vector files, got {len(vector_paths)}. Fix: pass two or more."
        )
    names = [_name(path) for path in vector_paths] if names is None else list(names)
    if len(names) != len(vector_paths) or len(set(names)) != len(names):
        raise ValueError(f"overlap: names {names} must be distinct, one per file. Fix: pass distinct names.")
    vectors = [read_vector_file(path).astype(np.float64) for path in vector_paths]
    shapes = {str(path): list(vector.shape) for path, vector in zip(vector_paths, vectors, strict=True)}
    if len({tuple(shape) for shape in shapes.values()}) > 1:
        raise ValueError(
            f"overlap: the vector files differ in shape: {shapes}. Fix: use vectors of one model."
        )
    norms = [np.linalg.norm(vector, axis=-1) for vector in vectors]
    rows = []
    for i, j in combinations(range(len(vectors)), 2):
        dots = (vectors[i] * vectors[j]).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cosines = np.where((norms[i] > 0) & (norms[j] > 0), dots / (norms[i] * norms[j]), np.nan)
        rows += [
            {"layer": layer, "a": names[i], "b": names[j], "cosine": float(c)}
            for layer, c in enumerate(cosines)
        ]
    return pd.DataFrame(rows, columns=["layer", "a", "b", "cosine"])


def plot_overlap(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Heatmap: one row per pair, one column per layer, colour = cosine in [-1, 1] (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = table.assign(pair=table["a"] + " · " + table["b"]).pivot(
        index="pair", columns="layer", values="cosine"
    )
    grid = grid.reindex(list(dict.fromkeys(table["a"] + " · " + table["b"])))  # pairs in the order given
    figure = Figure(
        figsize=(max(6, 0.25 * grid.shape[1] + 3), max(2.5, 0.4 * grid.shape[0] + 1.5)), layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(
        grid.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest"
    )
    axes.set_yticks(range(grid.shape[0]), grid.index)
    axes.set_xlabel("layer (0 = embeddings, L = output of block L-1)")
    figure.colorbar(image, ax=axes, label="cosine")
    if title:
        axes.set_title(title)
    write_figure(path, figure, dpi=120)


def write_overlap(
    vector_paths: Sequence[str | Path], out_dir: str | Path, names: Sequence[str] | None = None
) -> pd.DataFrame:
    """``out_dir/overlap.csv`` (layer, a, b, cosine) and ``out_dir/overlap.png``; returns the table."""
    table = overlap_table(vector_paths, names)
    out_dir = Path(out_dir)
    write_csv(out_dir / "overlap.csv", table)
    plot_overlap(table, out_dir / "overlap.png", title="cosine between persona vectors, per layer")
    return table
