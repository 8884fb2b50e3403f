"""Training-time interventions: preventative steering, concept ablation fine-tuning (CAFT) and projection capping.

(:class:`~persona.training.monitor.ActivationMonitor`, which measures instead, lives in ``monitor.py``.)
These callbacks rely only on ``pl_module.model`` (an HF causal LM, PEFT-wrapped or not) and ``pl_module.tokenizer``,
and hook layers only through :mod:`persona.hooks`. Layers follow the vector-file convention
(0 = embedding output, L = output of decoder block L-1).

Lifetime of the training-time hooks (:class:`PreventativeSteering`, :class:`ConceptAblation`,
:class:`ProjectionCapping`): attached in
``on_train_batch_start``, removed in ``on_train_batch_end``. That span holds the step's forward *and*
backward (gradient checkpointing re-runs block forwards, hooks included, during backward), and nothing
else: validation, predict and whatever runs after ``fit`` see the plain model. ``on_exception``,
``teardown`` and the start of any validation/predict loop remove them too.

Files are read and checked in ``setup``. The checks against the model (hidden size, layer count) run
there when the module already holds its model, else in ``on_fit_start`` (modules that build the model in
``configure_model``, which Lightning calls after the callbacks' ``setup``): either way before the sanity
check and the first step.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import Tensor, nn

from persona.hooks import block_hooks
from persona.hooks.layers import DecoderLayout, check_layer
from persona.hooks.operators import ablate_directions, orthonormalize
from persona.steering import CapSpec, SteeringSpec, steer
from persona.training.callback_base import (
    TrainStepHooks,
    check_against_model,
    check_rows,
)
from persona.vectors import load_metadata, load_vector
from persona.vectors.neutral_ranges import neutral_percentiles
from persona.vectors.ranges import NEUTRAL_KEY, needs_neutral, resolve_bound, stored_neutral


class PreventativeSteering(TrainStepHooks):
    """Preventative steering (Chen et al. 2025): add ``coef * v[L]`` at every position of layer L during training.

    The model then need not move along the trait direction to fit trait-laden data, so the fine-tuned
    model (evaluated without the vector) shifts less toward the trait.
    """

    def __init__(
        self,
        vector_path: str,
        layers: list[int],
        coef: float | None = None,
        during_validation: bool = False,
        dose: float | None = None,
        allow_high_dose: bool = False,
    ) -> None:
        """
        Args:
            vector_path: Persona vector file ``[num_layers + 1, hidden]``, e.g. ``evil_response_avg_diff.pt``.
            layers: Layers to steer (0 = embeddings, L = output of block L-1); row L of the file is added at layer L.
            coef: Multiplier of the vector; positive pushes toward the trait, as preventative steering does.
            during_validation: Also steer validation batches (default: training steps only).
            dose: Instead of coef: the push relative to each layer's typical residual norm, |coef|·‖v‖/mean‖h‖.
            allow_high_dose: Steer above the dose limit (the calibrated dose at the layer, else 1.0).
        """
        from persona.vectors.dose import one_of

        super().__init__(layers, during_validation)
        self.vector_path = str(vector_path)
        one_of(coef, dose, coef_flag="PreventativeSteering.coef", dose_flag="PreventativeSteering.dose")
        if coef is None and dose is None:
            raise ValueError("PreventativeSteering needs coef or dose. Fix: pass one (e.g. dose: 0.3).")
        self.coef, self.dose, self.allow_high_dose = coef, dose, allow_high_dose
        self.strengths: dict[int, tuple[float, float | None]] = {}  # layer -> (coef, dose) as applied
        self._tokenizer = None
        if not math.isfinite(float(coef if dose is None else dose)):
            raise ValueError(f"PreventativeSteering: coef={coef!r} is not finite. Fix: pass a finite number.")
        self._vector: Tensor | None = None
        self._specs: list[SteeringSpec] = []

    def _load_files(self) -> None:
        self._vector = load_vector(self.vector_path)
        check_rows("PreventativeSteering", self.vector_path, self._vector.shape[0], self.layers)

    def _prepare(self, layout: DecoderLayout) -> None:
        check_against_model("PreventativeSteering", self.vector_path, self._vector.shape, layout, rows=True)
        for index, layer in enumerate(self.layers):
            check_layer(layout, layer, what=f"PreventativeSteering.layers[{index}]")
        self.strengths = {layer: self._strength(layout, layer) for layer in self.layers}
        self._specs = [
            SteeringSpec(
                layer=layer,
                vector=self._vector[layer].to(layout.layer_device(layer)),
                coef=self.strengths[layer][0],
                positions="all",
            )
            for layer in self.layers
        ]

    def _bind(self, pl_module):
        self._tokenizer = getattr(pl_module, "tokenizer", None)  # to measure residual norms for an old file
        model = super()._bind(pl_module)
        logger = getattr(pl_module, "logger", None)
        if logger is not None:  # the dose beside the coefficient in TensorBoard's hparams
            applied = {}
            for layer, (coef, dose) in self.strengths.items():
                applied[f"preventative_steering/layer{layer}/coef"] = coef
                if dose is not None:
                    applied[f"preventative_steering/layer{layer}/dose"] = dose
            logger.log_hyperparams(applied)
        return model

    def _strength(self, layout: DecoderLayout, layer: int) -> tuple[float, float | None]:
        """(coef, dose) at ``layer``: the dose of a coef when the file's norms are known, the coef of a dose."""
        from persona.vectors.dose import layer_norms, resolve, stored_norms

        norms = stored_norms(self.vector_path)
        if norms is None and self.dose is not None:
            norms = layer_norms(self.vector_path, model=None, lm=layout.model, tokenizer=self._tokenizer)
        if norms is None:
            return float(self.coef), None
        flags = (
            "PreventativeSteering.coef",
            "PreventativeSteering.dose",
            "PreventativeSteering.allow_high_dose",
        )
        return resolve(self.vector_path, self._vector[layer], layer, norms, coef=self.coef, dose=self.dose,
                       force=self.allow_high_dose, flags=flags)  # fmt: skip

    def _hooks(self, model: nn.Module) -> AbstractContextManager:
        return steer(model, self._specs)


def _ablation_hook(basis: Tensor):
    def hook(hidden: Tensor, _state) -> Tensor:
        return ablate_directions(hidden, basis)

    return hook


def _load_directions(path: str) -> Tensor:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"ConceptAblation: directions file {path} does not exist. Fix: check directions_path."
        )
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"ConceptAblation: {path} is not a plain tensor file ({error}).") from error
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point() or tensor.dim() not in (1, 2, 3):
        found = list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(
            f"ConceptAblation: {path} holds {found}. Fix: save a float tensor [k, hidden] (the same directions at "
            "every layer) or [num_layers + 1, k, hidden] (per layer)."
        )
    return (tensor.unsqueeze(0) if tensor.dim() == 1 else tensor).float()


class ConceptAblation(TrainStepHooks):
    """CAFT (Casademunt et al. 2025): project the given directions out of the layer outputs during training.

    At each layer the directions (row L of each vector file, plus the directions file's ``[k, hidden]``
    or row L of its ``[num_layers + 1, k, hidden]``) are orthonormalised once, in ``setup``; dependent
    ones are dropped. Persona vector files belong in ``vector_paths``: a 2-D ``directions_path`` is read
    as k directions applied at every layer.
    """

    def __init__(
        self,
        vector_paths: list[str] | None = None,
        directions_path: str | None = None,
        *,
        layers: list[int],
        during_validation: bool = False,
    ) -> None:
        """
        Args:
            vector_paths: Persona vector files ``[num_layers + 1, hidden]``; row L of each is ablated at layer L.
            directions_path: Tensor file ``[k, hidden]`` (ablated at every layer) or ``[num_layers + 1, k, hidden]``.
            layers: Layers whose outputs lose the directions (0 = embeddings, L = output of block L-1).
            during_validation: Also ablate in validation batches (default: training steps only).
        """
        super().__init__(layers, during_validation)
        self.vector_paths = [str(path) for path in (vector_paths or [])]
        self.directions_path = None if directions_path is None else str(directions_path)
        if not self.vector_paths and self.directions_path is None:
            raise ValueError(
                "ConceptAblation: no directions. Fix: pass vector_paths, directions_path or both."
            )
        self.bases: dict[int, Tensor] = {}
        """Orthonormal basis ``[k', hidden]`` (float32, CPU) ablated at each layer, filled in ``setup``."""
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._placed: dict[int, Tensor] = {}

    def _load_files(self) -> None:
        per_layer: dict[int, list[Tensor]] = {layer: [] for layer in self.layers}
        for path in self.vector_paths:
            vector = load_vector(path)
            check_rows("ConceptAblation", path, vector.shape[0], self.layers)
            self._shapes[path] = tuple(vector.shape)
            for layer in self.layers:
                per_layer[layer].append(vector[layer : layer + 1])
        if self.directions_path is not None:
            directions = _load_directions(self.directions_path)
            self._shapes[self.directions_path] = tuple(directions.shape)
            if directions.dim() == 3:
                check_rows("ConceptAblation", self.directions_path, directions.shape[0], self.layers)
            for layer in self.layers:
                per_layer[layer].append(directions[layer] if directions.dim() == 3 else directions)
        widths = {path: shape[-1] for path, shape in self._shapes.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"ConceptAblation: the direction files disagree on hidden size: {widths}. "
                "Fix: use files extracted from the same model."
            )
        self.bases = {}
        for layer, parts in per_layer.items():
            try:
                self.bases[layer] = orthonormalize(torch.cat(parts))
            except ValueError as error:
                raise ValueError(
                    f"ConceptAblation: layer {layer}: {error} Files: {list(self._shapes)}."
                ) from error

    def _prepare(self, layout: DecoderLayout) -> None:
        for path, shape in self._shapes.items():
            check_against_model(
                "ConceptAblation", path, shape, layout, rows=path != self.directions_path or len(shape) == 3
            )
        for index, layer in enumerate(self.layers):
            check_layer(layout, layer, what=f"ConceptAblation.layers[{index}]")
        self._placed = {layer: basis.to(layout.layer_device(layer)) for layer, basis in self.bases.items()}

    def _hooks(self, model: nn.Module) -> AbstractContextManager:
        return block_hooks(model, [(layer, _ablation_hook(basis)) for layer, basis in self._placed.items()])


class ProjectionCapping(TrainStepHooks):
    """Activation capping during training: clamp the projection on ``v[L]`` to ``[lo, hi]`` at every position.

    Positions inside the range are left exactly as they are; outside, only the component along the unit
    direction is moved back to the bound (:func:`persona.hooks.operators.cap`), so the fine-tuned model cannot
    use excursions along the trait direction to fit the data, while ordinary activations pass untouched (CAFT,
    by contrast, removes the direction everywhere). Bounds are numbers in projection units or percentiles recorded
    at extraction, read per layer from the vector's sidecar: of its negative (trait-free) examples (``"p99"``) or of
    the neutral texts (``"neutral:p99"``; an older file gets those measured once with the model, before the first
    step, and cached beside it).
    """

    def __init__(
        self,
        vector_path: str,
        layers: list[int],
        lo: float | str | None = None,
        hi: float | str | None = "p99",
        during_validation: bool = False,
    ) -> None:
        """
        Args:
            vector_path: Persona vector file ``[num_layers + 1, hidden]``; row L is the direction capped at layer L.
            layers: Layers to cap (0 = embeddings, L = output of block L-1).
            lo: Lower bound on the projection (a number, a percentile such as ``"p1"`` or ``"neutral:p1"``, or None).
            hi: Upper bound (a number, a percentile such as ``"p99"`` — the default — or ``"neutral:p99"``, or None).
            during_validation: Also cap in validation batches (default: training steps only).
        """
        super().__init__(layers, during_validation)
        self.vector_path = str(vector_path)
        if lo is None and hi is None:
            raise ValueError(
                "ProjectionCapping: lo and hi are both None, so nothing is capped. Fix: give lo or hi."
            )
        self.lo, self.hi = lo, hi
        self.ranges: dict[int, tuple[float | None, float | None]] = {}
        """Layer -> (lo, hi) in projection units, resolved in ``setup``."""
        self._vector: Tensor | None = None
        self._specs: list[CapSpec] = []
        self._meta: dict = {}
        self._tokenizer = None

    def _load_files(self) -> None:
        self._vector = load_vector(self.vector_path)
        check_rows("ProjectionCapping", self.vector_path, self._vector.shape[0], self.layers)
        self._meta = load_metadata(self.vector_path)
        self.ranges = {}
        if not needs_neutral(self.lo, self.hi) or stored_neutral(self.vector_path, self._meta) is not None:
            self._resolve(self._meta)  # before the model loads; an older file's neutral bound waits for it

    def _resolve(self, meta: dict) -> None:
        for layer in self.layers:
            lo, hi = (
                resolve_bound(
                    value, path=self.vector_path, meta=meta, layer=layer, field=f"ProjectionCapping.{name}"
                )
                for name, value in (("lo", self.lo), ("hi", self.hi))
            )
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(
                    f"ProjectionCapping: at layer {layer}, lo={self.lo!r} ({lo:.4g}) is above hi={self.hi!r} "
                    f"({hi:.4g}) for {self.vector_path}. Fix: choose a lower lo or a higher hi."
                )
            self.ranges[layer] = (lo, hi)

    def _bind(self, pl_module):
        # To measure an older file's neutral percentiles.
        self._tokenizer = getattr(pl_module, "tokenizer", None)
        return super()._bind(pl_module)

    def _prepare(self, layout: DecoderLayout) -> None:
        check_against_model("ProjectionCapping", self.vector_path, self._vector.shape, layout, rows=True)
        for index, layer in enumerate(self.layers):
            check_layer(layout, layer, what=f"ProjectionCapping.layers[{index}]")
        if not self.ranges:  # neutral: measured once with the model being trained, before any step; cached
            record = neutral_percentiles(
                self.vector_path, model=None, lm=layout.model, tokenizer=self._tokenizer
            )
            self._resolve({**self._meta, NEUTRAL_KEY: record})
        self._specs = [
            CapSpec(layer, self._vector[layer].to(layout.layer_device(layer)), *self.ranges[layer])
            for layer in self.layers
        ]

    def _hooks(self, model: nn.Module) -> AbstractContextManager:
        return steer(model, self._specs)
