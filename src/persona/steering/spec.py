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

from persona.hooks import block_hooks, locate_blocks
from persona.hooks.layers import DecoderLayout, check_layer, hidden_size
from persona.hooks.operators import orthogonalise as gram_schmidt
from persona.hooks.operators import orthonormalize
from persona.hooks.registry import ForwardState
from persona.steering.interventions import (
    AblationSpec,
    CapSpec,
    Gate,
    check_gate,
    check_positions,
    direction_at,
)
from persona.steering.ops import (
    PreparedGate,
    PreparedSpec,
    intervention_hooks,
    steered_positions,  # noqa: F401  (its home before ops.py; rows and fast use it)
)


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
    when: Gate | None = None
    """Steer only the rows whose prompt passes this :class:`~persona.steering.Gate` (decided at prefill, held for
    the whole reply); None steers every row."""
    source_layers: int | None = field(default=None, init=False, repr=False)
    """Row count of the vector file the direction came from (checked against the model in :func:`steer`)."""

    def __post_init__(self) -> None:
        check_positions("SteeringSpec", self.positions)
        self.coef = float(self.coef)
        if not math.isfinite(self.coef):
            raise ValueError(f"SteeringSpec.coef={self.coef!r} is not finite. Fix: pass a finite number.")
        self.vector, self.source_layers = direction_at("SteeringSpec", self.vector, self.layer)
        check_gate("SteeringSpec", self.when, self.layer)
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


Spec = SteeringSpec | CapSpec | AblationSpec
"""Anything :func:`steer`, :func:`prepare_specs`, per-row batches and the fast path accept."""


def orthogonalise_specs(specs: Sequence[Spec]) -> tuple[list[Spec], dict[int, Tensor]]:
    """The :class:`SteeringSpec` entries at each layer orthogonalised in the order given (Gram-Schmidt, see
    :func:`persona.hooks.operators.orthogonalise`); caps and ablations pass through untouched.

    Entry i then pushes ``scale_i * (v_i - its part in the span of the earlier entries' vectors at its layer)``:
    exactly its own push minus whatever would move an earlier entry's direction. Each returned spec is absolute
    (``coef`` = the original's :meth:`SteeringSpec.scale`, so a relative dose keeps its size). Directions at
    different layers are left alone. Returns the new specs and, per layer with two or more entries, the cosine
    overlap ``[k, k]`` of the original vectors (entries in their order at that layer).
    """
    by_layer: dict[int, list[int]] = {}
    for index, spec in enumerate(specs):
        if isinstance(spec, SteeringSpec) and spec.coef != 0:
            by_layer.setdefault(spec.layer, []).append(index)
    result, overlaps = list(specs), {}
    for layer, indices in by_layer.items():
        if len(indices) < 2:
            continue
        vectors = torch.stack([specs[i].vector.detach().to("cpu", torch.float32) for i in indices])
        try:
            orthogonal, overlaps[layer] = gram_schmidt(vectors)
        except ValueError as error:
            raise ValueError(f"orthogonalise=True at layer {layer} (specs {indices}): {error}") from None
        for row, index in enumerate(indices):
            old = specs[index]
            result[index] = SteeringSpec(
                layer, orthogonal[row], old.scale(), positions=old.positions, when=old.when
            )
            result[index].source_layers = old.source_layers
    return result, overlaps


def _check_direction(layout: DecoderLayout, name: str, vector: Tensor, source_layers: int | None) -> None:
    width = hidden_size(layout)
    if source_layers is not None and source_layers != layout.num_layers + 1:
        raise ValueError(
            f"{name} came from a vector file with {source_layers} rows, but {type(layout.model).__name__} "
            f"needs {layout.num_layers + 1} (num_layers + 1). Fix: use a vector file extracted from this model."
        )
    if vector.shape[-1] != width:
        raise ValueError(
            f"{name} has hidden size {vector.shape[-1]}, but {type(layout.model).__name__} has hidden size "
            f"{width}. Fix: use a vector extracted from this model."
        )


def _placed(layout: DecoderLayout, layer: int, tensor: Tensor) -> Tensor:
    return tensor.detach().to(device=layout.layer_device(layer), dtype=torch.float32)


def _prepare_gate(layout: DecoderLayout, name: str, gate: Gate | None) -> PreparedGate | None:
    if gate is None:
        return None
    check_layer(layout, gate.layer, what=f"{name}.when.layer")
    _check_direction(layout, f"{name}.when.vector", gate.vector, gate.source_layers)
    return PreparedGate(gate.layer, _placed(layout, gate.layer, gate.vector), gate.above, gate.below)


def _prepare_one(layout: DecoderLayout, name: str, spec: Spec) -> PreparedSpec | None:
    if not isinstance(spec, (SteeringSpec, CapSpec, AblationSpec)):
        raise TypeError(
            f"{name} is a {type(spec).__name__}. Fix: pass SteeringSpec, CapSpec or AblationSpec."
        )
    check_layer(layout, spec.layer, what=f"{name}.layer")
    vector = spec.directions if isinstance(spec, AblationSpec) else spec.vector
    what = "directions" if isinstance(spec, AblationSpec) else "vector"
    _check_direction(layout, f"{name}.{what}", vector, getattr(spec, "source_layers", None))
    gate = _prepare_gate(layout, name, spec.when)
    if isinstance(spec, CapSpec):
        direction = _placed(layout, spec.layer, spec.vector)
        return PreparedSpec(
            spec.layer, spec.positions, direction, kind="cap", lo=spec.lo, hi=spec.hi, gate=gate
        )
    if isinstance(spec, AblationSpec):
        try:
            basis = orthonormalize(spec.directions.detach().to("cpu", torch.float32))
        except ValueError as error:
            raise ValueError(f"{name}.directions: {error} Fix: pass non-zero directions.") from None
        return PreparedSpec(
            spec.layer, spec.positions, _placed(layout, spec.layer, basis), kind="ablate", gate=gate
        )
    if spec.coef == 0:
        return None
    direction = _placed(layout, spec.layer, spec.vector)
    return PreparedSpec(spec.layer, spec.positions, direction, spec.scale(), gate=gate)


def prepare_specs(
    layout: DecoderLayout, specs: Sequence[Spec], *, what: str = "specs", orthogonalise: bool = False
) -> list[PreparedSpec]:
    """Check every spec against the model (layers, source file depth, hidden size); drop ``coef == 0`` steering.

    ``orthogonalise``: first :func:`orthogonalise_specs` (the steering entries at each layer, in order).
    """
    return [spec for _, spec in prepare_indexed(layout, specs, what=what, orthogonalise=orthogonalise)]


def prepare_indexed(
    layout: DecoderLayout, specs: Sequence[Spec], *, what: str = "specs", orthogonalise: bool = False
) -> list[tuple[int, PreparedSpec]]:
    """:func:`prepare_specs` with each prepared entry's index in ``specs`` (to report per entry, e.g. gates)."""
    specs = list(specs)
    if orthogonalise:
        specs, _ = orthogonalise_specs(specs)
    prepared = [(index, _prepare_one(layout, f"{what}[{index}]", spec)) for index, spec in enumerate(specs)]
    return [(index, spec) for index, spec in prepared if spec is not None]


@contextmanager
def steer(
    model: nn.Module,
    specs: Sequence[Spec] | Spec,
    *,
    state: ForwardState | None = None,
    orthogonalise: bool = False,
) -> Iterator[DecoderLayout]:
    """Apply every spec inside the block: steering adds, caps, ablations, each optionally gated (:class:`Gate`).

    Entries at the same layer apply in the order given, after every gate at that layer has read it. All specs
    are validated against the model before any hook is attached. Specs with ``coef == 0`` attach no hook at all,
    so the model is bit-identical to the unsteered one; so is a cap whose range holds every activation, and a
    gated entry whose gate fires for no row. Gradients flow through the hidden states; vectors are constants.
    ``state``: see :func:`block_hooks` (a caller that builds batches sets ``state.prompt_mask`` so prompt
    positions are found under 4D masks). ``orthogonalise``: see :func:`orthogonalise_specs`.
    """
    if isinstance(specs, (SteeringSpec, CapSpec, AblationSpec)):
        specs = [specs]
    layout = locate_blocks(model)
    hooks = intervention_hooks(prepare_specs(layout, list(specs), orthogonalise=orthogonalise))
    with block_hooks(model, hooks, state=state):
        yield layout
