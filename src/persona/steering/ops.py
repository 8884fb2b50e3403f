"""Prepared interventions and the hooks that apply them: where (positions by phase), whether (gates), what (add,
cap, ablate through :mod:`persona.hooks.operators`).

A :class:`PreparedSpec` is validated data placed on its layer's device; :func:`intervention_hooks` turns a list of
them into ``(layer, fn)`` hooks for :func:`persona.hooks.block_hooks` (``steer``) or for the fast path's
dispatchers, which therefore apply the very same functions. Inside a compiled decode step nothing here reads a
value off the device and no Python number that changes per call is traced: bounds and deltas are tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from persona.hooks.operators import ablate_directions, add_direction, cap, gate_fires, gather_positions
from persona.hooks.phase import PhaseError
from persona.hooks.registry import ForwardState, HookFn


def _prefill_positions(positions: str, hidden: Tensor, state: ForwardState) -> Tensor | None:
    """bool [batch, seq] (or broadcastable) of the prefill positions to steer; None = all of them."""
    batch, seq_len = hidden.shape[:2]
    padding = state.padding_mask(seq_len, hidden.device, batch)
    if padding is None and state.attention_mask is not None:
        prompt = state.prompt_mask
        found = (
            ""
            if prompt is None
            else f" (the caller's prompt mask is {list(prompt.shape)}, the forward [{batch}, {seq_len}])"
        )
        raise ValueError(
            f"Steering positions={positions!r} need each row's real tokens at prefill, but this forward got a "
            f"4D or per-layer-type attention mask (a static KV cache passes one){found}. Fix: set "
            "ForwardState.prompt_mask to the batch's 2D prompt mask (generate_steered does), or use "
            "positions='all' or 'generated'."
        )
    if positions == "prompt":
        return padding
    return state.last_token_mask(seq_len, hidden.device, batch)


def steered_positions(positions: str, hidden: Tensor, state: ForwardState) -> Tensor | bool:
    """Where ``positions`` steers in this forward: True (every position), False (none) or bool [batch or 1, seq].

    The one definition of the position modes, shared by :func:`persona.steering.steer`, per-row steering
    (:mod:`persona.steering.rows`) and the fast path, so a row of a mixed batch is steered where it would be alone.
    """
    if state.packed is not None:  # one packed forward mixes requests and phases: no mode is right for all
        raise PhaseError(state.phase)
    if positions == "all":
        return True
    if state.prefill:
        if positions == "generated":
            return False
        where = _prefill_positions(positions, hidden, state)
        return True if where is None else where
    # A decode step's positions are all new tokens (one, unless a candidate chunk is verified at once).
    return positions != "prompt"


def last_prompt_reading(hidden: Tensor, state: ForwardState) -> Tensor:
    """[batch, hidden]: each row's last real prompt token at prefill (a gate's reading), either padding side."""
    batch, seq_len = hidden.shape[:2]
    where = _prefill_positions("response", hidden, state)
    if where is None:
        where = state.last_token_mask(seq_len, hidden.device, batch)
    index = where.expand(batch, seq_len).to(torch.long).argmax(dim=-1)
    return gather_positions(hidden, index)


@dataclass(frozen=True)
class PreparedGate:
    """A validated :class:`~persona.steering.Gate`: direction float32 [hidden] on its layer's device."""

    layer: int
    direction: Tensor = field(repr=False)
    above: float | None
    below: float | None


@dataclass(frozen=True)
class PreparedSpec:
    """A validated intervention placed for its layer.

    ``kind``: ``add`` (``hidden + scale * direction``), ``cap`` (projection on ``direction`` clamped to ``[lo,
    hi]``) or ``ablate`` (the span of the orthonormal ``direction [k, hidden]`` projected out).
    """

    layer: int
    positions: str
    direction: Tensor = field(repr=False)  # float32, on the device of the layer's block
    scale: float = 1.0
    kind: str = "add"
    lo: float | None = None
    hi: float | None = None
    gate: PreparedGate | None = None

    @property
    def delta(self) -> Tensor:
        """What an ``add`` adds: ``scale * direction`` (the product, bit for bit, on every path)."""
        return self.scale * self.direction


class GateState:
    """The per-row decision of one conditional entry: made at prefill, held through the decode steps.

    Readers (hooks at the gate layers, registered before the entries) store their rows' decisions; at prefill
    the entry combines them (``always``: rows that apply regardless, for per-row batches) and keeps the result,
    which every decode step reuses. A new prefill (the next ``generate``) decides afresh.
    """

    def __init__(self, readers: int, always: Tensor | None = None):
        self.readers = readers
        self.always = always
        self.readings: list[Tensor] = []
        self.fired: Tensor | None = None

    def reader(self, direction: Tensor, above, below) -> HookFn:
        def hook(hidden: Tensor, state: ForwardState) -> None:
            if state.prefill:
                self.readings.append(gate_fires(last_prompt_reading(hidden, state), direction, above, below))

        return hook

    def rows(self, state: ForwardState) -> Tensor:
        """bool [batch or 1, 1]: the rows this entry applies to in the current forward."""
        if state.prefill:
            readings, self.readings = self.readings, []
            if len(readings) != self.readers:
                raise RuntimeError(
                    f"A gate expected {self.readers} prefill reading(s) and got {len(readings)}: its layer did "
                    "not run before the gated entry. Fix: gate on a layer <= the entry's layer."
                )
            fired = readings[0] if self.always is None else self.always
            for reading in readings[int(self.always is None) :]:
                fired = fired | reading
            self.fired = fired.unsqueeze(1)
        elif self.fired is None:
            raise RuntimeError(
                "A gated entry saw a decode step before any prefill, so it has no decision to hold. Fix: attach "
                "the interventions before generate() starts (with steer(...): model.generate(...))."
            )
        return self.fired


def gated_positions(where: Tensor | bool, gate: GateState | None, state: ForwardState) -> Tensor | bool:
    """``where`` (from :func:`steered_positions`) narrowed to the rows the gate fired for."""
    if gate is None:
        return where
    rows = gate.rows(
        state
    )  # even where nothing is steered now: a prefill's decision is made and held either way
    if where is False:
        return False
    return rows if where is True else where & rows


def _bound(value: float | None, device) -> Tensor | None:
    # a tensor, not a float: a new bound must not recompile a compiled decode step
    return None if value is None else torch.tensor(value, dtype=torch.float32, device=device)


class _Apply:
    """One prepared entry as a hook fn (a class, not a closure: torch.compile traces it the same way each call)."""

    def __init__(self, spec: PreparedSpec, gate: GateState | None):
        self.kind, self.positions, self.gate = spec.kind, spec.positions, gate
        device = spec.direction.device
        self.tensor = spec.delta if spec.kind == "add" else spec.direction
        self.lo, self.hi = _bound(spec.lo, device), _bound(spec.hi, device)

    def __call__(self, hidden: Tensor, state: ForwardState) -> Tensor | None:
        where = gated_positions(steered_positions(self.positions, hidden, state), self.gate, state)
        if where is False:
            return None
        mask = None if where is True else where
        if self.kind == "add":
            return add_direction(hidden, self.tensor, 1.0, mask)
        if self.kind == "cap":
            return cap(hidden, self.tensor, self.lo, self.hi, mask)
        ablated = ablate_directions(hidden, self.tensor)
        return ablated if mask is None else torch.where(mask.unsqueeze(-1), ablated, hidden)


def intervention_hooks(prepared: list[PreparedSpec]) -> list[tuple[int, HookFn]]:
    """``(layer, fn)`` for :func:`persona.hooks.block_hooks`: every gate reader first (so each reads its layer
    before any entry there edits it), then the entries in the order given."""
    readers, entries = [], []
    for spec in prepared:
        gate = None
        if spec.gate is not None:
            gate = GateState(readers=1)
            readers.append(
                (spec.gate.layer, gate.reader(spec.gate.direction, spec.gate.above, spec.gate.below))
            )
        entries.append((spec.layer, _Apply(spec, gate)))
    return readers + entries
