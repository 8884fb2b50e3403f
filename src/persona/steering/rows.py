"""Per-row steering and ablation: one forward over a batch whose rows each carry their own interventions.

Row ``b`` of a batch run under :func:`steer_rows` gets what :func:`persona.steering.steer` with
``rows[b].specs`` gives that row on its own: the same positions (one definition,
:func:`persona.steering.steered_positions`), the same floating-point operations in the same order (a
row without a given spec adds an exact zero). Ablations run first at their layer, then the specs in
order, so a request that ablates and steers the same trait ends up with exactly the push it asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from persona.hooks import block_hooks, locate_blocks
from persona.hooks.layers import DecoderLayout, check_layer
from persona.hooks.operators import ablate_row_directions, add_row_directions
from persona.hooks.registry import ForwardState
from persona.steering.spec import PreparedSpec, SteeringSpec, hidden_size, prepare_specs, steered_positions


@dataclass
class RowInterventions:
    """What one row of a batch gets."""

    specs: Sequence[SteeringSpec] = ()
    """Steering specs, applied as :func:`persona.steering.steer` applies them (in order, same layer composes)."""
    ablations: Mapping[int, Tensor] = field(default_factory=dict)
    """Layer -> orthonormal directions ``[k, hidden]`` projected out of that layer's output (see ``orthonormalize``)."""


@dataclass
class _Slot:
    """The i-th spec at one layer of every row that has one: a delta per row ([batch, hidden], zeros elsewhere)."""

    deltas: Tensor
    rows_by_mode: dict[str, Tensor]  # positions mode -> row indices using it

    def positions(self, hidden: Tensor, state: ForwardState) -> Tensor | None:
        """bool [batch, seq] of where each row is steered in this forward; None = every position of every row."""
        wheres = {mode: steered_positions(mode, hidden, state) for mode in self.rows_by_mode}
        if all(where is True for where in wheres.values()):
            return None
        batch, seq = hidden.shape[:2]
        mask = torch.zeros(batch, seq, dtype=torch.bool, device=hidden.device)
        for mode, rows in self.rows_by_mode.items():
            where = wheres[mode]
            if where is True:
                mask[rows] = True
            elif where is not False:
                mask[rows] = where.to(hidden.device).expand(batch, seq)[rows]
        return mask


def _slots_at(layer: int, prepared: list[list[PreparedSpec]], width: int, device) -> list[_Slot]:
    per_row = [[spec for spec in row if spec.layer == layer] for row in prepared]
    slots = []
    for index in range(max(len(specs) for specs in per_row)):
        deltas = torch.zeros(len(per_row), width, dtype=torch.float32, device=device)
        modes: dict[str, list[int]] = {}
        for row, specs in enumerate(per_row):
            if index < len(specs):
                spec = specs[index]
                deltas[row] = spec.scale * spec.direction  # the product steer() adds, bit for bit
                modes.setdefault(spec.positions, []).append(row)
            else:
                modes.setdefault("all", []).append(row)  # zero delta: adds nothing anywhere
        rows_by_mode = {mode: torch.tensor(rows, device=device) for mode, rows in modes.items()}
        slots.append(_Slot(deltas, rows_by_mode))
    return slots


def _bases_at(layer: int, rows: Sequence[RowInterventions], width: int, device) -> Tensor | None:
    """[batch, k_max, hidden] bases padded with zero rows, or None when no row ablates at ``layer``."""
    per_row = [row.ablations.get(layer) for row in rows]
    k_max = max((0 if basis is None else basis.shape[0]) for basis in per_row)
    if k_max == 0:
        return None
    bases = torch.zeros(len(rows), k_max, width, dtype=torch.float32, device=device)
    for row, basis in enumerate(per_row):
        if basis is not None:
            bases[row, : basis.shape[0]] = basis.to(device=device, dtype=torch.float32)
    return bases


def _row_hook(bases: Tensor | None, slots: list[_Slot]):
    def hook(hidden: Tensor, state: ForwardState) -> Tensor:
        if bases is not None:
            hidden = ablate_row_directions(hidden, bases)
        for slot in slots:
            hidden = add_row_directions(hidden, slot.deltas, slot.positions(hidden, state))
        return hidden

    return hook


def _check_ablations(layout: DecoderLayout, rows: Sequence[RowInterventions], width: int) -> None:
    for index, row in enumerate(rows):
        for layer, basis in row.ablations.items():
            check_layer(layout, layer, what=f"rows[{index}].ablations layer")
            if basis.dim() != 2 or basis.shape[-1] != width:
                raise ValueError(
                    f"rows[{index}].ablations[{layer}] has shape {list(basis.shape)}; "
                    f"{type(layout.model).__name__} needs [k, {width}]. Fix: pass directions from this model."
                )


@contextmanager
def steer_rows(model: nn.Module, rows: Sequence[RowInterventions]) -> Iterator[DecoderLayout]:
    """Row ``b`` of every forward inside the block gets ``rows[b]``; the batch must have ``len(rows)`` rows.

    Everything is validated before any hook is attached; layers where no row intervenes get no hook.
    """
    layout = locate_blocks(model)
    width = hidden_size(layout)
    prepared = [
        prepare_specs(layout, row.specs, what=f"rows[{index}].specs") for index, row in enumerate(rows)
    ]
    _check_ablations(layout, rows, width)
    layers = sorted(
        {spec.layer for row in prepared for spec in row} | {k for row in rows for k in row.ablations}
    )
    hooks = []
    for layer in layers:
        device = layout.layer_device(layer)
        slots = _slots_at(layer, prepared, width, device)
        hooks.append((layer, _row_hook(_bases_at(layer, rows, width, device), slots)))
    with block_hooks(model, hooks):
        yield layout
