"""Per-row interventions: one forward over a batch whose rows each carry their own steering, caps, ablations, gates.

Row ``b`` of a batch run under :func:`steer_rows` gets what :func:`persona.steering.steer` with
``rows[b].specs`` gives that row on its own: the same positions (one definition,
:func:`persona.steering.steered_positions`), the same gate decision (read from that row's last prompt token), the
same floating-point operations in the same order (a row without a given entry gets an exact identity: a zero
add, a zero basis, an unbounded cap). The ``ablations`` mapping runs first at its layer, then the specs in order,
so a request that ablates and steers the same trait ends up with exactly the push it asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from persona.hooks import block_hooks, locate_blocks
from persona.hooks.layers import DecoderLayout, check_layer
from persona.hooks.operators import ablate_row_directions, add_row_directions, cap
from persona.hooks.registry import ForwardState
from persona.steering.ops import GateState, PreparedSpec, steered_positions
from persona.steering.spec import Spec, hidden_size, prepare_indexed


@dataclass
class RowInterventions:
    """What one row of a batch gets."""

    specs: Sequence[Spec] = ()
    """Steering, cap and ablation specs (optionally gated), applied as :func:`persona.steering.steer` applies them
    (in order at each layer, after the gates there have read it)."""
    ablations: Mapping[int, Tensor] = field(default_factory=dict)
    """Layer -> orthonormal directions ``[k, hidden]`` projected out of that layer's output (see ``orthonormalize``)."""
    orthogonalise: bool = False
    """Orthogonalise this row's steering entries at each layer in order (see ``orthogonalise_specs``)."""


INF = float("inf")


@dataclass
class _Slot:
    """The i-th entry at one layer of every row that has one, as per-row tensors (identity for the other rows)."""

    rows_by_mode: dict[str, Tensor]  # positions mode -> row indices using it
    deltas: Tensor | None = None  # [batch, hidden]: add
    bases: Tensor | None = None  # [batch, k, hidden]: ablate
    cap: tuple[Tensor, Tensor, Tensor] | None = None  # directions [batch, hidden], lo [batch], hi [batch]
    gate: GateState | None = None

    def positions(self, hidden: Tensor, state: ForwardState) -> Tensor | None:
        """bool [batch, seq] of where each row gets its entry in this forward; None = everywhere."""
        wheres = {mode: steered_positions(mode, hidden, state) for mode in self.rows_by_mode}
        if self.gate is None and all(where is True for where in wheres.values()):
            return None
        batch, seq = hidden.shape[:2]
        mask = torch.zeros(batch, seq, dtype=torch.bool, device=hidden.device)
        for mode, rows in self.rows_by_mode.items():
            where = wheres[mode]
            if where is True:
                mask[rows] = True
            elif where is not False:
                mask[rows] = where.to(hidden.device).expand(batch, seq)[rows]
        return mask if self.gate is None else mask & self.gate.rows(state)

    def __call__(self, hidden: Tensor, state: ForwardState) -> Tensor:
        where = self.positions(hidden, state)
        if self.deltas is not None:
            hidden = add_row_directions(hidden, self.deltas, where)
        if self.bases is not None:
            ablated = ablate_row_directions(hidden, self.bases)
            hidden = ablated if where is None else torch.where(where.unsqueeze(-1), ablated, hidden)
        if self.cap is not None:
            hidden = cap(hidden, *self.cap, where)
        return hidden


def _gate_readers(entries: list[PreparedSpec | None], width: int, device) -> tuple[GateState | None, list]:
    """The slot's gate (None when no row's entry is gated) and its ``(layer, reader)`` hooks, one per gate layer."""
    gated = [
        (row, spec.gate) for row, spec in enumerate(entries) if spec is not None and spec.gate is not None
    ]
    if not gated:
        return None, []
    batch = len(entries)
    always = torch.ones(batch, dtype=torch.bool, device=device)
    for row, _ in gated:
        always[row] = False
    layers = sorted({gate.layer for _, gate in gated})
    state = GateState(readers=len(layers), always=always)
    readers = []
    for layer in layers:
        gate_device = next(gate.direction.device for _, gate in gated if gate.layer == layer)
        directions = torch.zeros(batch, width, dtype=torch.float32, device=gate_device)
        above = torch.full((batch,), INF, device=gate_device)
        below = torch.full((batch,), -INF, device=gate_device)
        for row, gate in gated:
            if gate.layer == layer:
                directions[row] = gate.direction
                above[row] = INF if gate.above is None else gate.above
                below[row] = -INF if gate.below is None else gate.below
        readers.append((layer, state.reader(directions, above, below)))
    return state, readers


def _slot(entries: list[PreparedSpec | None], width: int, device) -> tuple[_Slot, list]:
    batch, kinds = len(entries), {spec.kind for spec in entries if spec is not None}
    modes: dict[str, list[int]] = {}
    for row, spec in enumerate(entries):
        modes.setdefault("all" if spec is None else spec.positions, []).append(row)
    gate, readers = _gate_readers(entries, width, device)
    slot = _Slot({mode: torch.tensor(rows, device=device) for mode, rows in modes.items()}, gate=gate)
    if "add" in kinds:
        slot.deltas = torch.zeros(batch, width, dtype=torch.float32, device=device)
    if "ablate" in kinds:
        k_max = max(spec.direction.shape[0] for spec in entries if spec is not None and spec.kind == "ablate")
        slot.bases = torch.zeros(batch, k_max, width, dtype=torch.float32, device=device)
    if "cap" in kinds:
        slot.cap = (
            torch.zeros(batch, width, dtype=torch.float32, device=device),
            torch.full((batch,), -INF, device=device),
            torch.full((batch,), INF, device=device),
        )
    for row, spec in enumerate(entries):
        if spec is None:
            continue
        if spec.kind == "add":
            slot.deltas[row] = spec.delta  # the product steer() adds, bit for bit
        elif spec.kind == "ablate":
            slot.bases[row, : spec.direction.shape[0]] = spec.direction
        else:
            slot.cap[0][row] = spec.direction
            slot.cap[1][row] = -INF if spec.lo is None else spec.lo
            slot.cap[2][row] = INF if spec.hi is None else spec.hi
    return slot, readers


class RowGates:
    """Where each row's gated entries keep their decisions: read :meth:`fired` once the prefill has run.

    Pass one to :func:`steer_rows` (``gates=``); it is filled when the hooks are attached.
    """

    def __init__(self):
        self.entries: dict[int, list[tuple[int, GateState]]] = {}  # row -> [(index in row.specs, state)]

    def add(self, row: int, spec_index: int, state: GateState) -> None:
        self.entries.setdefault(row, []).append((spec_index, state))

    def fired(self, row: int) -> dict[int, bool]:
        """Index in ``rows[row].specs`` -> whether that gated entry fired for this row (after the prefill)."""
        decided = {}
        for spec_index, state in self.entries.get(row, []):
            if state.fired is not None:
                decided[spec_index] = bool(state.fired[row].item())
        return decided


Indexed = list[tuple[int, PreparedSpec]]


def _slots_at(
    layer: int, prepared: list[Indexed], width: int, device, gates: RowGates | None
) -> tuple[list[_Slot], list]:
    per_row = [[(i, spec) for i, spec in row if spec.layer == layer] for row in prepared]
    slots, readers = [], []
    for index in range(max(len(specs) for specs in per_row)):
        at = [row[index] if index < len(row) else (None, None) for row in per_row]
        slot, slot_readers = _slot([spec for _, spec in at], width, device)
        slots.append(slot)
        readers.extend(slot_readers)
        for row, (spec_index, spec) in enumerate(at):
            if gates is not None and spec is not None and spec.gate is not None:
                gates.add(row, spec_index, slot.gate)
    return slots, readers


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
            hidden = slot(hidden, state)
        return hidden

    return hook


def check_ablations(layout: DecoderLayout, rows: Sequence[RowInterventions], width: int) -> None:
    for index, row in enumerate(rows):
        for layer, basis in row.ablations.items():
            check_layer(layout, layer, what=f"rows[{index}].ablations layer")
            if basis.dim() != 2 or basis.shape[-1] != width:
                raise ValueError(
                    f"rows[{index}].ablations[{layer}] has shape {list(basis.shape)}; "
                    f"{type(layout.model).__name__} needs [k, {width}]. Fix: pass directions from this model."
                )


@contextmanager
def steer_rows(
    model: nn.Module, rows: Sequence[RowInterventions], *, gates: RowGates | None = None
) -> Iterator[DecoderLayout]:
    """Row ``b`` of every forward inside the block gets ``rows[b]``; the batch must have ``len(rows)`` rows.

    Everything is validated before any hook is attached; layers where no row intervenes get no hook. Gate
    readers are registered ahead of every entry, so each reads its layer before any row's entry there edits it.
    ``gates``: a :class:`RowGates` to learn, per row and gated entry, whether its gate fired.
    """
    layout = locate_blocks(model)
    width = hidden_size(layout)
    prepared = [
        prepare_indexed(layout, row.specs, what=f"rows[{index}].specs", orthogonalise=row.orthogonalise)
        for index, row in enumerate(rows)
    ]
    check_ablations(layout, rows, width)
    layers = sorted(
        {spec.layer for row in prepared for _, spec in row} | {k for row in rows for k in row.ablations}
    )
    readers, hooks = [], []
    for layer in layers:
        device = layout.layer_device(layer)
        slots, slot_readers = _slots_at(layer, prepared, width, device, gates)
        readers.extend(slot_readers)
        hooks.append((layer, _row_hook(_bases_at(layer, rows, width, device), slots)))
    with block_hooks(model, readers + hooks):
        yield layout
