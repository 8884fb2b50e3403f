"""Interventions beyond adding a vector: projection capping (:class:`CapSpec`), ablation (:class:`AblationSpec`) and
the condition that makes any of them, or a :class:`~persona.steering.spec.SteeringSpec`, conditional (:class:`Gate`).

Every bound and threshold is in projection units (the scalar projection on the unit direction, as ``persona
project`` reports) or a percentile name (``"p99"`` of the trait-free examples, ``"neutral:p99"`` of the neutral
texts) resolved against the vector file's sidecar by the ``from_file`` constructors (:mod:`persona.vectors.ranges`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from persona.core.constants import POSITIONS
from persona.vectors.files import load_metadata, load_vector
from persona.vectors.ranges import is_percentile_name, resolve_bound


def direction_at(owner: str, vector, layer: int) -> tuple[Tensor, int | None]:
    """``(direction [hidden], rows of the vector file or None)`` from a ``[hidden]`` or ``[num_layers + 1, hidden]``
    float tensor; errors name ``owner`` (e.g. ``SteeringSpec``) and the fix."""
    vector = torch.as_tensor(vector)
    if not vector.is_floating_point() or vector.dim() not in (1, 2):
        raise ValueError(
            f"{owner}.vector has dtype {vector.dtype} and shape {tuple(vector.shape)}. Fix: pass a float "
            "tensor [hidden] or a vector file tensor [num_layers + 1, hidden]."
        )
    if vector.dim() == 1:
        return vector, None
    if not 0 <= layer < vector.shape[0]:
        raise ValueError(
            f"{owner}.layer={layer} is out of range for a vector file with {vector.shape[0]} rows. "
            f"Fix: choose a layer in 0..{vector.shape[0] - 1}."
        )
    return vector[layer], vector.shape[0]


def check_positions(owner: str, positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"{owner}.positions={positions!r} is unknown. Fix: use one of {POSITIONS}.")


def check_gate(owner: str, when, layer: int) -> None:
    """A gate reads its layer at prefill before the entry applies: its layer may not come after the entry's."""
    if when is None:
        return
    if not isinstance(when, Gate):
        raise TypeError(
            f"{owner}.when is a {type(when).__name__}. Fix: pass a persona.steering.Gate or None."
        )
    if when.layer > layer:
        raise ValueError(
            f"{owner}.when.layer={when.layer} comes after the entry's layer {layer}: the prefill decision must be "
            f"made before the entry applies. Fix: gate on a layer <= {layer}."
        )


@dataclass
class Gate:
    """Apply an entry to a row only when that row's prompt projects past a threshold on a condition direction.

    Decision rule: at prefill, the activation at ``layer`` of each row's **last real prompt token** (read before
    any intervention at that layer) is projected on the unit ``vector``; the row fires when the projection is
    strictly above ``above`` or strictly below ``below`` (give exactly one). The decision is held for the row's
    whole generation: decode steps reuse it and never re-decide, so a reply is either the steered or the
    unsteered model's, never a mix; a gate that fires for no row leaves every row bit-identical to no entry.

    Why the last prompt token and not the prompt mean: it is the position that has read the whole prompt and
    from which the reply starts, and its projection is what the persona-vectors paper (and ``persona project``'s
    ``prompt_last``) found to predict the trait of the reply; a prompt mean is diluted by the chat template and
    system prompt, which every request shares, and shifts with prompt length.
    """

    layer: int
    """Layer the condition is read at (vector-file convention); must not come after the gated entry's layer."""
    vector: Tensor = field(repr=False)
    """Condition direction ``[hidden]``, or a vector file ``[num_layers + 1, hidden]`` (row ``layer`` is used)."""
    above: float | None = None
    """Fire when the projection is above this (projection units)."""
    below: float | None = None
    """Fire when the projection is below this (projection units)."""
    source_layers: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.above is None) == (self.below is None):
            raise ValueError(
                f"Gate(above={self.above!r}, below={self.below!r}): give exactly one threshold. Fix: pass above= "
                "to fire on prompts that pull toward the direction, or below= for those that pull away."
            )
        for name in ("above", "below"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, numeric_bound("Gate", name, value, self.layer))
        self.vector, self.source_layers = direction_at("Gate", self.vector, self.layer)

    @classmethod
    def from_file(cls, path: str | Path, layer: int, *, above=None, below=None) -> Gate:
        """A gate on a vector file's row ``layer``; a threshold may be a percentile of its sidecar (``"p95"``)."""
        meta = load_metadata(path)
        resolved = {
            name: resolve_bound(value, path=path, meta=meta, layer=layer, field=f"Gate.{name}")
            for name, value in (("above", above), ("below", below))
        }
        return cls(layer, load_vector(path), **resolved)


@dataclass
class CapSpec:
    """Clamp the projection on a direction to ``[lo, hi]`` at one layer (activation capping).

    Positions whose projection lies inside the range keep their values exactly; outside, only the component
    along the unit direction changes (:func:`persona.hooks.operators.cap`). ``lo`` or ``hi`` may be None (one-
    sided); with :meth:`from_file` either may be a percentile of the file's negative examples (``"p99"``) or of the
    neutral texts (``"neutral:p99"``).
    """

    layer: int
    vector: Tensor = field(repr=False)
    """Direction ``[hidden]``, or a vector file ``[num_layers + 1, hidden]`` (row ``layer`` is used)."""
    lo: float | None = None
    hi: float | None = None
    positions: str = "all"
    """Where the cap applies; the modes of :class:`~persona.steering.spec.SteeringSpec` (default: everywhere)."""
    when: Gate | None = None
    """Cap only the rows whose prompt passes this gate."""
    source_layers: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_positions("CapSpec", self.positions)
        if self.lo is None and self.hi is None:
            raise ValueError(
                "CapSpec: lo and hi are both None, so nothing is capped. Fix: give lo, hi or both."
            )
        self.lo = numeric_bound("CapSpec", "lo", self.lo, self.layer)
        self.hi = numeric_bound("CapSpec", "hi", self.hi, self.layer)
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise ValueError(f"CapSpec: lo={self.lo} is above hi={self.hi}. Fix: pass lo <= hi.")
        self.vector, self.source_layers = direction_at("CapSpec", self.vector, self.layer)
        check_gate("CapSpec", self.when, self.layer)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        layer: int,
        *,
        lo=None,
        hi=None,
        positions: str = "all",
        when: Gate | None = None,
    ) -> CapSpec:
        """A cap on a vector file's row ``layer``; ``lo``/``hi``: numbers or percentiles of its sidecar."""
        meta = load_metadata(path)
        lo = resolve_bound(lo, path=path, meta=meta, layer=layer, field="CapSpec.lo")
        hi = resolve_bound(hi, path=path, meta=meta, layer=layer, field="CapSpec.hi")
        return cls(layer, load_vector(path), lo, hi, positions=positions, when=when)


@dataclass
class AblationSpec:
    """Project directions out of one layer's output (CAFT's operator), optionally only for rows a gate picks."""

    layer: int
    directions: Tensor = field(repr=False)
    """``[hidden]`` or ``[k, hidden]`` at this layer; orthonormalised (dependent ones dropped) when prepared."""
    positions: str = "all"
    when: Gate | None = None

    def __post_init__(self) -> None:
        check_positions("AblationSpec", self.positions)
        directions = torch.as_tensor(self.directions)
        if not directions.is_floating_point() or directions.dim() not in (1, 2):
            raise ValueError(
                f"AblationSpec.directions has dtype {directions.dtype} and shape {tuple(directions.shape)}. Fix: "
                "pass a float tensor [hidden] or [k, hidden]."
            )
        if not bool(torch.isfinite(directions).all()):
            raise ValueError(
                "AblationSpec.directions holds NaN or infinite values. Fix: pass finite directions."
            )
        self.directions = directions if directions.dim() == 2 else directions.unsqueeze(0)
        check_gate("AblationSpec", self.when, self.layer)


def numeric_bound(owner: str, name: str, value, layer: int) -> float | None:
    """A bound given to the constructor: a number or None (percentiles need the file: ``from_file``)."""
    if is_percentile_name(value):
        raise ValueError(
            f"{owner}.{name}={value!r} is a percentile, and a tensor has no sidecar to read it from. Fix: use "
            f"{owner}.from_file(path, layer, {name}={value!r}) or pass a number."
        )
    return resolve_bound(value, path=None, meta=None, layer=layer, field=f"{owner}.{name}")
