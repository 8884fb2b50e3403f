"""One forward's plan: per layer, the pushes and edits of every request in the packed batch, then the read-outs.

Built once per forward (before block 0) from the scheduler's segments; applied at each hooked layer with
persona's operation order per request: the gate readings at that layer first, then its entries there in order
(the ``ablations`` mapping first), then the monitor read-outs. Slot ``k`` holds the ``k``-th entry of each request
there: additions go into one ``[tokens, hidden]`` delta (an exact zero on every other token, so ``h + 0 == h``),
ablations and caps edit their request's rows only. A request's tokens get the operations
:func:`persona.steering.steer` gives them alone.

Gates (``when``): a gated entry's decision is read once, from the last prompt token at the gate's layer, in the
forward whose chunk holds that token (before any entry at that layer, as ``steer`` reads it), and held for the
rest of the reply (also through a re-prefill after an eviction). Until then the entry is an edit that looks the
decision up when applied: the gate layer is never after the entry's, so within that forward the reading comes
first. An earlier prefill chunk cannot know the decision, so a request whose undecided entry steers prompt tokens
(``prompt`` or ``all``) first runs a *gate probe* (:func:`gate_probe`): its prompt alone, with only the entries
below the highest gate layer (all a reading depends on), which decides every gate; the request then starts with
its decisions made. A chunk that still meets an undecided entry it touches fails its request, never guesses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from persona.generation.engine.plan import Segment
from persona.hooks.operators import ablate_directions, add_direction, cap, gate_fires
from persona.steering import PreparedSpec

Entry = tuple[int, PreparedSpec]
"""(index in the request's ``interventions.specs``, -1 for the ``ablations`` mapping; the prepared entry)."""


@dataclass
class Live:
    """A request in flight: its prepared entries per layer, monitor directions, sampling, gate decisions, readings."""

    entries: dict[int, list[Entry]]
    monitor: dict[int, Tensor]
    temperature: float
    top_p: float
    generator: torch.Generator | None
    readings: dict[int, dict[int, Tensor]] = field(default_factory=dict)
    fired: dict[int, bool] = field(default_factory=dict)
    """Index in ``interventions.specs`` -> whether that gated entry's gate fired (once its prompt was read)."""
    min_new_tokens: int = 0
    stop_ids: Tensor | None = None
    generated: int = 0
    error: str | None = None
    apply_below: int | None = None
    """A gate probe's: entries at this layer and above are not applied (their gates are still read)."""

    def stacked_readings(self) -> dict[int, Tensor]:
        return {
            layer: torch.stack([by_position[p] for p in sorted(by_position)])
            for layer, by_position in self.readings.items()
            if by_position
        }


def needs_probe(live: Live) -> bool:
    """Whether an undecided gated entry of ``live`` steers prompt tokens before its gate can be read."""
    return any(
        spec.gate is not None and index not in live.fired and spec.positions in ("prompt", "all")
        for entries in live.entries.values()
        for index, spec in entries
    )


def gate_probe(live: Live) -> Live:
    """A request that runs ``live``'s prompt only to read every gate: entries below the highest gate layer apply
    (a gate's reading depends on nothing above its layer), greedy, no read-outs."""
    top = max(
        spec.gate.layer for entries in live.entries.values() for _, spec in entries if spec.gate is not None
    )
    return Live(live.entries, {}, 0.0, 1.0, None, apply_below=top)


@dataclass
class _Edit:
    segment: Segment
    spec: PreparedSpec
    where: Tensor  # bool [segment tokens]
    decided_by: tuple[Live, int] | None = (
        None  # an undecided gate: (request, spec index) to look up when applied
    )


@dataclass
class _Slot:
    delta: Tensor | None = None  # [tokens, hidden] float32
    edits: list[_Edit] = field(default_factory=list)


@dataclass
class LayerPlan:
    gates: list[tuple[Live, int, PreparedSpec, int]] = field(
        default_factory=list
    )  # request, index, spec, row
    slots: list[_Slot] = field(default_factory=list)
    monitors: list[tuple[Live, Segment, Tensor]] = field(default_factory=list)

    def slot(self, index: int) -> _Slot:
        while len(self.slots) <= index:
            self.slots.append(_Slot())
        return self.slots[index]


def build_plan(segments: list[Segment], live: dict[str, Live], tokens: int, width: int, devices) -> dict:
    """layer -> :class:`LayerPlan` for one forward of ``tokens`` packed tokens (requests not in ``live``, e.g.
    just cancelled, or failed, get nothing)."""
    plan: dict[int, LayerPlan] = {}
    for segment in segments:
        request = live.get(segment.request_id)
        if request is None or request.error is not None:
            continue
        request.error = _undecidable(request, segment)
        if request.error is not None:
            continue  # nothing of this request's is applied: the engine fails it with the reason
        _plan_request(plan, request, segment, tokens, width, devices)
        for layer, directions in request.monitor.items():
            plan.setdefault(layer, LayerPlan()).monitors.append((request, segment, directions))
    return plan


def _holds_last_prompt_token(segment: Segment) -> bool:
    return segment.first <= segment.prompt_len - 1 < segment.first + segment.end - segment.start


def _undecidable(request: Live, segment: Segment) -> str | None:
    """Why this chunk cannot be planned (a gated entry it touches before its gate is read), or None."""
    if _holds_last_prompt_token(segment):
        return None
    for layer, entries in request.entries.items():
        if request.apply_below is not None and layer >= request.apply_below:
            continue
        for index, spec in entries:
            undecided = spec.gate is not None and index not in request.fired
            if undecided and bool(segment.where(spec.positions).any()):
                return _UNDECIDABLE.format(index=index, positions=spec.positions)
    return None


def _plan_request(plan: dict, request: Live, segment: Segment, tokens: int, width: int, devices) -> None:
    last_prompt = segment.prompt_len - 1
    holds_last = _holds_last_prompt_token(segment)
    rows = torch.arange(segment.start, segment.end)
    for layer, entries in request.entries.items():
        layer_plan = plan.setdefault(layer, LayerPlan())
        applies = request.apply_below is None or layer < request.apply_below
        for slot_index, (index, spec) in enumerate(entries):
            decided_by = None
            if spec.gate is not None and index not in request.fired:
                if not holds_last:
                    continue  # touches nothing in this chunk (checked by _undecidable)
                gate_row = segment.start + last_prompt - segment.first
                plan.setdefault(spec.gate.layer, LayerPlan()).gates.append((request, index, spec, gate_row))
                decided_by = (request, index)
            elif spec.gate is not None and not request.fired[index]:
                continue
            if not applies:
                continue
            where = segment.where(spec.positions)
            if not bool(where.any()):
                continue
            slot = layer_plan.slot(slot_index)
            if spec.kind != "add" or decided_by is not None:
                slot.edits.append(_Edit(segment, spec, where, decided_by))
                continue
            if slot.delta is None:
                slot.delta = torch.zeros(tokens, width, dtype=torch.float32, device=devices(layer))
            slot.delta[rows[where]] = spec.delta  # the product steer() adds, bit for bit


_UNDECIDABLE = (
    "interventions.specs[{index}] is gated (when=...) with positions={positions!r}, and its prompt was prefilled "
    "in chunks before the last prompt token that decides its gate was read (a gated entry below another gate's "
    "layer). Fix: raise the engine's max_batch_tokens (persona serve --max_batch_tokens) above the prompt length, "
    "or use positions 'response' or 'generated'."
)


def _edit(hidden: Tensor, edit: _Edit) -> None:
    segment, spec = edit.segment, edit.spec
    part = hidden[:, segment.start : segment.end]
    mask = edit.where.to(hidden.device).unsqueeze(0)
    if spec.kind == "add":
        hidden[:, segment.start : segment.end] = add_direction(part, spec.delta, 1.0, mask)  # as steer() adds
    elif spec.kind == "cap":
        hidden[:, segment.start : segment.end] = cap(part, spec.direction, spec.lo, spec.hi, mask)
    else:
        ablated = ablate_directions(part, spec.direction)
        hidden[:, segment.start : segment.end] = torch.where(mask.unsqueeze(-1), ablated, part)


def apply_plan(layer_plan: LayerPlan, layer: int, hidden: Tensor) -> Tensor:
    """``hidden [1, tokens, width]`` after every request's entries at this layer; gates and read-outs recorded."""
    for request, index, spec, row in layer_plan.gates:
        reading = hidden[0, row : row + 1]  # the last prompt token, before any entry at this layer
        request.fired[index] = bool(
            gate_fires(reading, spec.gate.direction, spec.gate.above, spec.gate.below)
        )
    for slot in layer_plan.slots:
        if slot.delta is not None:
            hidden = hidden + slot.delta.to(hidden.dtype).unsqueeze(0)
        edits = [e for e in slot.edits if e.decided_by is None or e.decided_by[0].fired[e.decided_by[1]]]
        if edits:
            hidden = hidden.clone()
            for edit in edits:
                _edit(hidden, edit)
    for request, segment, directions in layer_plan.monitors:
        projections = hidden[0, segment.start : segment.end].float() @ directions.T
        record = request.readings.setdefault(layer, {})
        for position, row in zip(segment.positions.tolist(), projections, strict=True):
            record[position] = row
    return hidden
