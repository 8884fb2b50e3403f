"""Inference steering: add persona vectors to the residual stream while a model runs or generates.

Positions are chosen by *phase* (prefill vs cached decode step, see :class:`persona.hooks.registry.ForwardState`),
never by absolute token index, so steering stays right under KV caching and either padding side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from persona.core.constants import POSITIONS
from persona.hooks import block_hooks, locate_blocks
from persona.hooks.layers import DecoderLayout, check_layer, hidden_size
from persona.hooks.operators import add_direction
from persona.hooks.registry import ForwardState


@dataclass
class SteeringSpec:
    """One vector added at one layer: ``hidden + coef * vector`` at the positions chosen by ``positions``."""

    layer: int
    """Layer in the vector-file convention: 0 = embedding output, L = output of decoder block L-1."""
    vector: Tensor = field(repr=False)
    """Direction ``[hidden]``, or a whole vector file ``[num_layers + 1, hidden]`` (row ``layer`` is used)."""
    coef: float
    """Multiplier. With ``relative=True`` it is a fraction of ``reference_norm`` instead (see below)."""
    positions: str = "response"
    """``response``: at prefill the last real prompt token of each row, then every decode-step token (the
    seed research code's choice, so its coefficients transfer). ``generated``: decode-step tokens only.
    ``prompt``: every real prefill token only. ``all``: every position of every forward."""
    relative: bool = False
    """If True, add ``coef * reference_norm * vector / ||vector||``: ``coef`` is then the size of the push
    relative to the layer's typical residual norm, which transfers across layers and models."""
    reference_norm: float | None = None
    """Typical residual norm at ``layer``, e.g. from :func:`mean_residual_norm`; required when ``relative``."""
    source_layers: int | None = field(default=None, init=False, repr=False)
    """Row count of the vector file the direction came from (checked against the model in :func:`steer`)."""

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(
                f"SteeringSpec.positions={self.positions!r} is unknown. Fix: use one of {POSITIONS}."
            )
        self.coef = float(self.coef)
        if not math.isfinite(self.coef):
            raise ValueError(f"SteeringSpec.coef={self.coef!r} is not finite. Fix: pass a finite number.")
        vector = torch.as_tensor(self.vector)
        if not vector.is_floating_point() or vector.dim() not in (1, 2):
            raise ValueError(
                f"SteeringSpec.vector has dtype {vector.dtype} and shape {tuple(vector.shape)}. Fix: pass a float "
                "tensor [hidden] or a vector file tensor [num_layers + 1, hidden]."
            )
        if vector.dim() == 2:
            if not 0 <= self.layer < vector.shape[0]:
                raise ValueError(
                    f"SteeringSpec.layer={self.layer} is out of range for a vector file with {vector.shape[0]} "
                    f"rows. Fix: choose a layer in 0..{vector.shape[0] - 1}."
                )
            self.source_layers = vector.shape[0]
            vector = vector[self.layer]
        self.vector = vector
        if self.relative:
            norm = self.reference_norm
            if norm is None or not math.isfinite(norm) or norm <= 0:
                raise ValueError(
                    f"SteeringSpec.reference_norm={norm!r} but relative=True needs a positive norm. Fix: pass "
                    "reference_norm=mean_residual_norm(model, tokenizer, texts, layer)."
                )

    def scale(self) -> float:
        """The factor multiplying ``vector``: ``coef``, or ``coef * reference_norm / ||vector||`` if relative."""
        if not self.relative:
            return self.coef
        vector_norm = float(self.vector.double().norm())
        if vector_norm == 0:
            raise ValueError(f"SteeringSpec at layer {self.layer}: relative=True needs a non-zero vector.")
        return self.coef * self.reference_norm / vector_norm


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

    The one definition of the position modes, shared by :func:`steer` and per-row steering
    (:mod:`persona.steering.rows`), so a row of a mixed batch is steered where it would be on its own.
    """
    if positions == "all":
        return True
    if state.prefill:
        if positions == "generated":
            return False
        where = _prefill_positions(positions, hidden, state)
        return True if where is None else where
    # A decode step's positions are all new tokens (one, unless a candidate chunk is verified at once).
    return positions != "prompt"


def _steering_hook(positions: str, direction: Tensor, scale: float):
    """Hook fn for ``block_hooks``: no Python loop over the batch, no host sync, out-of-place add."""

    def hook(hidden: Tensor, state: ForwardState) -> Tensor | None:
        where = steered_positions(positions, hidden, state)
        if where is False:
            return None
        return add_direction(hidden, direction, scale, None if where is True else where)

    return hook


@dataclass(frozen=True)
class PreparedSpec:
    """A validated :class:`SteeringSpec` with its direction placed for its layer: ``hidden + scale * direction``."""

    layer: int
    positions: str
    direction: Tensor = field(repr=False)  # float32 [hidden], on the device of the layer's block
    scale: float


def prepare_specs(
    layout: DecoderLayout, specs: Sequence[SteeringSpec], *, what: str = "specs"
) -> list[PreparedSpec]:
    """Check every spec against the model (layer range, source file depth, hidden size); drop ``coef == 0`` ones."""
    width = hidden_size(layout)
    prepared = []
    for index, spec in enumerate(specs):
        name = f"{what}[{index}]"
        if not isinstance(spec, SteeringSpec):
            raise TypeError(f"{name} is a {type(spec).__name__}. Fix: pass SteeringSpec objects.")
        check_layer(layout, spec.layer, what=f"{name}.layer")
        if spec.source_layers is not None and spec.source_layers != layout.num_layers + 1:
            raise ValueError(
                f"{name}.vector came from a vector file with {spec.source_layers} rows, but "
                f"{type(layout.model).__name__} needs {layout.num_layers + 1} (num_layers + 1). Fix: use a "
                "vector file extracted from this model."
            )
        if spec.vector.shape[-1] != width:
            raise ValueError(
                f"{name}.vector has hidden size {spec.vector.shape[-1]}, but {type(layout.model).__name__} "
                f"has hidden size {width}. Fix: use a vector extracted from this model."
            )
        if spec.coef == 0:
            continue
        direction = spec.vector.detach().to(device=layout.layer_device(spec.layer), dtype=torch.float32)
        prepared.append(PreparedSpec(spec.layer, spec.positions, direction, spec.scale()))
    return prepared


@contextmanager
def steer(
    model: nn.Module, specs: Sequence[SteeringSpec] | SteeringSpec, *, state: ForwardState | None = None
) -> Iterator[DecoderLayout]:
    """Apply every spec (one hook each; specs at the same layer compose in order) inside the block.

    All specs are validated against the model before any hook is attached. Specs with ``coef == 0``
    attach no hook at all, so the model is bit-identical to the unsteered one. Gradients flow through
    the hidden states; the vector itself is treated as a constant. ``state``: see :func:`block_hooks` (a
    caller that builds batches sets ``state.prompt_mask`` so prompt positions are found under 4D masks).
    """
    specs = [specs] if isinstance(specs, SteeringSpec) else list(specs)
    layout = locate_blocks(model)
    hooks = [
        (spec.layer, _steering_hook(spec.positions, spec.direction, spec.scale))
        for spec in prepare_specs(layout, specs)
    ]
    with block_hooks(model, hooks, state=state):
        yield layout
