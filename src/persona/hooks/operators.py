"""Pure tensor operators applied by hooks: add, ablate, capture. No model needed to test them."""

from __future__ import annotations

import torch


def add_direction(
    hidden: torch.Tensor, vector: torch.Tensor, coef: float, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """``hidden + coef * vector`` at the selected positions.

    hidden: [batch, seq, hidden]; vector: [hidden]; positions: bool [batch, seq] or None for all.
    """
    delta = (coef * vector).to(hidden.dtype)
    if positions is None:
        return hidden + delta
    return hidden + positions.unsqueeze(-1).to(hidden.dtype) * delta


def add_row_directions(
    hidden: torch.Tensor, deltas: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """``hidden + deltas[b]`` at the selected positions of each row ``b``: a different push per row.

    hidden: [batch, seq, hidden]; deltas: [batch, hidden] (a zero row leaves that row exactly as it was);
    positions: bool [batch, seq] or None for all. Row ``b`` gets the same floating-point operations as
    ``add_direction(hidden[b:b+1], direction_b, 1.0, positions[b:b+1])`` with ``deltas[b] = coef_b * direction_b``.
    """
    deltas = deltas.to(hidden.dtype).unsqueeze(1)
    if positions is None:
        return hidden + deltas
    return hidden + positions.unsqueeze(-1).to(hidden.dtype) * deltas


def orthonormalize(directions: torch.Tensor, *, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis [k', hidden] of the span of ``directions`` [k, hidden] (QR; drops dependent ones)."""
    if directions.dim() == 1:
        directions = directions.unsqueeze(0)
    q, r = torch.linalg.qr(directions.to(torch.float64).T)
    keep = r.diagonal().abs() > tol * max(1.0, float(r.diagonal().abs().max()))
    if not bool(keep.any()):
        raise ValueError("Cannot ablate: all directions are zero (or numerically so).")
    return q[:, keep].T.to(directions.dtype).contiguous()


def ablate_directions(hidden: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Project the span of the orthonormal ``basis`` [k, hidden] out of ``hidden`` [..., hidden]."""
    basis = basis.to(hidden.dtype)
    return hidden - (hidden @ basis.T) @ basis


def ablate_row_directions(hidden: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Project a different span out of each row: hidden [batch, seq, hidden], bases [batch, k, hidden].

    ``bases[b]`` is an orthonormal basis for row ``b`` padded with zero rows (a row of zeros removes nothing,
    and an all-zero basis leaves the row exactly as it was).
    """
    bases = bases.to(hidden.dtype)
    return hidden - torch.bmm(torch.bmm(hidden, bases.transpose(1, 2)), bases)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean over the masked positions: hidden [batch, seq, hidden], mask [batch, seq] -> [batch, hidden].

    Rows with an empty mask give zeros (callers count only rows with tokens).
    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1).clamp_min(1.0)
    return (hidden * weights).sum(dim=1) / counts


def gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [batch, seq, hidden], index [batch] -> [batch, hidden]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def project(hidden: torch.Tensor, directions: torch.Tensor, *, cosine: bool = False) -> torch.Tensor:
    """Scalar projection on unit directions (the seed's ``a_proj_b``), or cosine similarity.

    One direction ``[hidden]``: ``hidden [..., hidden] -> [...]``. One direction per target ``[n, hidden]``:
    ``hidden [..., n, hidden] -> [..., n]`` (target i of ``hidden`` on direction i); every hidden state on
    every direction: ``project(hidden[..., None, :], directions)``. Shapes broadcast.
    """
    if directions.dim() not in (1, 2):
        raise ValueError(
            f"project takes directions [hidden] or [n, hidden], got shape {list(directions.shape)}."
        )
    directions = directions.to(hidden)
    if cosine:
        return torch.nn.functional.cosine_similarity(hidden, directions, dim=-1)  # broadcasts
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (hidden * unit).sum(dim=-1)
