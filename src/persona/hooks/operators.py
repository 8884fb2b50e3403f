"""Pure tensor operators applied by hooks: add, ablate, cap, gate, orthogonalise, capture. No model needed to test them."""

from __future__ import annotations

from collections.abc import Sequence

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


def _per_row(value, batch_dims: int, device) -> torch.Tensor | float:
    """A bound as a float, or a per-row tensor [batch] shaped to broadcast over ``batch_dims`` trailing dims."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.to(device=device, dtype=torch.float32)
    return value.reshape(value.shape + (1,) * batch_dims) if value.dim() == 1 else value


def cap(
    hidden: torch.Tensor,
    vector: torch.Tensor,
    lo: float | torch.Tensor | None,
    hi: float | torch.Tensor | None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clamp each position's scalar projection on the unit ``vector`` to ``[lo, hi]``; the orthogonal part is kept.

    hidden: [batch, seq, hidden]; vector: [hidden], or [batch, hidden] for a direction per row (a zero row has
    projection 0); lo, hi: a float, None (no bound on that side) or a tensor [batch] per row (-inf / +inf: no
    bound); positions: bool [batch or 1, seq] or None for all. Returns [batch, seq, hidden].

    A position whose projection lies inside the range, or that ``positions`` leaves out, keeps ``hidden``'s own
    values (selected, not recomputed), so a range holding every activation is bit-identical to no cap. Outside,
    ``h + (clamp(p) - p) * unit`` with ``p = h . unit``, computed in float32.
    """
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
        raise ValueError(f"cap: lo={lo} is above hi={hi}. Fix: pass lo <= hi.")
    vector = vector.to(device=hidden.device, dtype=torch.float32)
    unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if unit.dim() == 2:
        unit = unit.unsqueeze(1)  # [batch, 1, hidden]
    wide = hidden.to(torch.float32)
    projection = (wide * unit).sum(dim=-1)  # [batch, seq]
    lo, hi = _per_row(lo, 1, hidden.device), _per_row(hi, 1, hidden.device)
    below = torch.zeros_like(projection, dtype=torch.bool) if lo is None else projection < lo
    above = torch.zeros_like(projection, dtype=torch.bool) if hi is None else projection > hi
    target = projection
    if lo is not None:
        target = torch.where(below, lo, target)
    if hi is not None:
        target = torch.where(above, hi, target)
    outside = below | above
    if positions is not None:
        outside = outside & positions.to(device=hidden.device, dtype=torch.bool)
    moved = (wide + (target - projection).unsqueeze(-1) * unit).to(hidden.dtype)
    return torch.where(outside.unsqueeze(-1), moved, hidden)


def gate_fires(
    reading: torch.Tensor,
    direction: torch.Tensor,
    above: float | torch.Tensor | None = None,
    below: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Which rows a conditional intervention fires for: bool [batch].

    reading: [batch, hidden], the activation each row's decision is read from (the callers pass the last real
    prompt token at prefill, see :class:`persona.steering.Gate`); direction: [hidden] or [batch, hidden];
    above / below: a float, None, or a tensor [batch] (+inf / -inf: that side never fires). A row fires when its
    scalar projection on the unit direction is strictly above ``above`` or strictly below ``below``.
    """
    direction = direction.to(device=reading.device, dtype=torch.float32)
    projection = project(reading.to(torch.float32), direction)
    fires = torch.zeros(reading.shape[0], dtype=torch.bool, device=reading.device)
    if above is not None:
        fires = fires | (projection > _per_row(above, 0, reading.device))
    if below is not None:
        fires = fires | (projection < _per_row(below, 0, reading.device))
    return fires


def orthogonalise(
    vectors: torch.Tensor, order: Sequence[int] | None = None, *, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram-Schmidt in a stated order: each vector minus its component in the span of those before it.

    vectors: [k, hidden]; order: a permutation of ``range(k)`` (default: as given). Returns ``(orthogonal,
    overlap)``: ``orthogonal [k, hidden]`` in the input's row order, row ``order[0]`` unchanged and every later
    one keeping only what is new (not renormalised: a push keeps exactly its part that moves no earlier
    direction); ``overlap [k, k]``, the cosines of the *input* vectors. Computed in float64, returned in the
    input's dtype. A vector with (almost) nothing left, under ``tol`` of its norm, is refused.
    """
    if vectors.dim() != 2:
        raise ValueError(f"orthogonalise takes vectors [k, hidden], got shape {list(vectors.shape)}.")
    k = vectors.shape[0]
    order = list(range(k)) if order is None else [int(index) for index in order]
    if sorted(order) != list(range(k)):
        raise ValueError(
            f"orthogonalise: order={order} is not a permutation of 0..{k - 1}. Fix: list each once."
        )
    wide = vectors.to(torch.float64)
    norms = wide.norm(dim=-1)
    if bool((norms == 0).any()):
        raise ValueError(f"orthogonalise: vector(s) {torch.nonzero(norms == 0).flatten().tolist()} are zero.")
    overlap = (wide @ wide.T) / (norms[:, None] * norms[None, :])
    basis: list[torch.Tensor] = []
    result = torch.empty_like(wide)
    for index in order:
        remainder = wide[index].clone()
        for unit in basis:
            remainder -= (remainder @ unit) * unit  # modified Gram-Schmidt: stable for near-parallel inputs
        if float(remainder.norm()) <= tol * float(norms[index]):
            raise ValueError(
                f"orthogonalise: vector {index} lies in the span of those before it in order {order}; nothing is "
                "left of it. Fix: drop it, or put it earlier in the order."
            )
        result[index] = remainder
        basis.append(remainder / remainder.norm())
    return result.to(vectors.dtype), overlap.to(vectors.dtype)
