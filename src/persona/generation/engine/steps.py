"""One forward's plan: per layer, the pushes and edits of every request in the packed batch, then the read-outs.

Built once per forward (before block 0) from the scheduler's segments; applied at each hooked layer with
persona's operation order per request: its entries at that layer in order (the ``ablations`` mapping first),
then the monitor read-outs. Slot ``k`` holds the ``k``-th entry of each request there: additions go into one
``[tokens, hidden]`` delta (an exact zero on every other token, so ``h + 0 == h``), ablations and caps edit their
request's rows only. A request's tokens get the operations :func:`persona.steering.steer` gives them alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from persona.generation.engine.plan import Segment
from persona.hooks.operators import ablate_directions, cap
from persona.steering import PreparedSpec


@dataclass
class Live:
    """A request in flight: its prepared entries per layer, monitor directions, generator and readings."""

    entries: dict[int, list[PreparedSpec]]
    monitor: dict[int, Tensor]
    temperature: float
    top_p: float
    generator: torch.Generator | None
    readings: dict[int, dict[int, Tensor]] = field(default_factory=dict)
    stop_ids: list[int] = field(default_factory=list)
    min_new_tokens: int = 0

    def stacked_readings(self) -> dict[int, Tensor]:
        return {
            layer: torch.stack([by_position[p] for p in sorted(by_position)])
            for layer, by_position in self.readings.items()
            if by_position
        }


@dataclass
class _Slot:
    delta: Tensor | None = None  # [tokens, hidden] float32
    edits: list[tuple[Segment, PreparedSpec, Tensor]] = field(default_factory=list)


@dataclass
class LayerPlan:
    slots: list[_Slot] = field(default_factory=list)
    monitors: list[tuple[Live, Segment, Tensor]] = field(default_factory=list)

    def slot(self, index: int) -> _Slot:
        while len(self.slots) <= index:
            self.slots.append(_Slot())
        return self.slots[index]


def build_plan(segments: list[Segment], live: dict[str, Live], tokens: int, width: int, devices) -> dict:
    """layer -> :class:`LayerPlan` for one forward of ``tokens`` packed tokens (requests not in ``live``, e.g.
    just cancelled, get nothing)."""
    plan: dict[int, LayerPlan] = {}
    for segment in segments:
        request = live.get(segment.request_id)
        if request is None:
            continue
        rows = torch.arange(segment.start, segment.end)
        for layer, entries in request.entries.items():
            layer_plan = plan.setdefault(layer, LayerPlan())
            for index, spec in enumerate(entries):
                where = segment.where(spec.positions)
                if not bool(where.any()):
                    continue
                slot = layer_plan.slot(index)
                if spec.kind != "add":
                    slot.edits.append((segment, spec, where))
                    continue
                if slot.delta is None:
                    slot.delta = torch.zeros(tokens, width, dtype=torch.float32, device=devices(layer))
                slot.delta[rows[where]] = spec.delta  # the product steer() adds, bit for bit
        for layer, directions in request.monitor.items():
            plan.setdefault(layer, LayerPlan()).monitors.append((request, segment, directions))
    return plan


def _edit(hidden: Tensor, segment: Segment, spec: PreparedSpec, where: Tensor) -> None:
    part = hidden[:, segment.start : segment.end]
    mask = where.to(hidden.device).unsqueeze(0)
    if spec.kind == "cap":
        hidden[:, segment.start : segment.end] = cap(part, spec.direction, spec.lo, spec.hi, mask)
    else:
        ablated = ablate_directions(part, spec.direction)
        hidden[:, segment.start : segment.end] = torch.where(mask.unsqueeze(-1), ablated, part)


def apply_plan(layer_plan: LayerPlan, layer: int, hidden: Tensor) -> Tensor:
    """``hidden [1, tokens, width]`` after every request's entries at this layer; the read-outs recorded."""
    for slot in layer_plan.slots:
        if slot.delta is not None:
            hidden = hidden + slot.delta.to(hidden.dtype).unsqueeze(0)
        if slot.edits:
            hidden = hidden.clone()
            for segment, spec, where in slot.edits:
                _edit(hidden, segment, spec, where)
    for request, segment, directions in layer_plan.monitors:
        projections = hidden[0, segment.start : segment.end].float() @ directions.T
        record = request.readings.setdefault(layer, {})
        for position, row in zip(segment.positions.tolist(), projections, strict=True):
            record[position] = row
    return hidden
