"""The traits a server can steer, ablate and monitor: vector files loaded once, and requests resolved against them.

A trait is a ``<trait>_response_avg_diff.pt`` file in the ``--vectors`` folder (the kind used for
steering, see README "File formats"). Its default layer is, in order: the layer recommended by
``persona layers`` (``<stem>_layers/layer_metrics.csv`` beside the file), ``--fallback_layer``, or
60 % of the model's depth.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from persona.hooks.operators import orthonormalize
from persona.serve.schema import AblateItem, ApiError, PersonaFields, SteerItem, WhenItem
from persona.steering import AblationSpec, CapSpec, Gate, SteeringSpec, orthogonalise_specs
from persona.steering.rows import RowInterventions
from persona.vectors import layers_dir, load_vector

VECTOR_SUFFIX = "_response_avg_diff.pt"


@dataclass(frozen=True)
class Trait:
    name: str
    path: Path
    vectors: Tensor = field(repr=False)  # [num_layers + 1, hidden] float32
    default_layer: int
    layer_source: str  # layer_metrics | fallback_layer | depth
    norms: tuple[float, ...] | None = (
        None  # mean residual norm per layer (persona.vectors.dose), None: unknown
    )
    recommended: dict | None = None  # `persona calibrate`'s {layer, dose, coef, ...} from the sidecar
    meta: dict = field(default_factory=dict, repr=False)  # the sidecar (+ the neutral percentiles when known)

    def direction(self, layer: int) -> Tensor:
        return self.vectors[layer]

    def describe(self) -> dict:
        return {
            "default_layer": self.default_layer,
            "default_layer_source": self.layer_source,
            "vector_file": self.path.name,
            "vector_norm_at_default_layer": round(float(self.vectors[self.default_layer].norm()), 4),
            "recommended": self.recommended,
            "doses": self.norms is not None,
        }

    def calibrated_doses(self) -> dict[int, float]:
        """The dose limit per calibrated layer (``persona calibrate``), read from the sidecar."""
        from persona.vectors import load_metadata

        layers = (load_metadata(self.path).get("calibration") or {}).get("layers", {})
        return {
            int(layer): float(entry["dose"])
            for layer, entry in layers.items()
            if entry.get("dose") is not None
        }


def recommended_layer(vector_path: Path) -> int | None:
    """The layer ``persona layers`` recommended for this vector file, if it was run."""
    metrics = layers_dir(vector_path) / "layer_metrics.csv"
    if not metrics.is_file():
        return None
    with metrics.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("recommended", "").strip().lower() == "true":
                return int(row["layer"])
    return None


def check_vectors_fit_adapter(directory: str | Path, adapter: str) -> str:
    """Vectors served with a LoRA adapter come from its base model or from the adapter itself (their sidecars say
    which model they were extracted from); another base's are refused. Returns which they are, for the log."""
    from persona.core.errors import PersonaError
    from persona.models import adapter_base, base_model_name, is_adapter, model_short_name
    from persona.vectors import load_metadata

    base = adapter_base(adapter)
    kinds = set()
    for path in sorted(Path(directory).glob(f"*{VECTOR_SUFFIX}")):
        meta = load_metadata(path)
        source = meta.get("base_model") or meta.get("model")
        if source is None:
            continue
        if model_short_name(base_model_name(source) if is_adapter(source) else source) != model_short_name(
            base
        ):
            raise PersonaError(
                f"--vectors {directory}: {path.name} was extracted from {source!r}, not from {base!r} (the adapter's "
                f"base) or the adapter. Fix: --vectors with that base's vectors, or extract this model's own: "
                f"persona extract --model {adapter} ..."
            )
        kinds.add("the adapter's own" if meta.get("adapter") else "the base model's")
    return " and ".join(sorted(kinds)) or "of unrecorded origin"


def load_traits(
    directory: str | Path, *, num_layers: int, hidden_size: int, fallback_layer: int | None = None,
    lm=None, tokenizer=None, model: str | None = None,
) -> dict[str, Trait]:  # fmt: skip
    """Every ``<trait>_response_avg_diff.pt`` in ``directory``, checked against the model's shape.

    With the loaded model (``lm``, ``tokenizer``), a file whose sidecar has no residual norms gets them measured
    once and cached beside it, so every trait takes doses; without it such a trait takes coefficients only."""
    from persona.vectors.dose import layer_norms, recommendation, stored_norms

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"--vectors {directory} is not a folder. Fix: pass the folder holding <trait>{VECTOR_SUFFIX} files, "
            "e.g. persona_vectors/smollm2-135m (written by `persona extract`)."
        )
    if fallback_layer is not None and not 1 <= fallback_layer <= num_layers:
        raise ValueError(f"--fallback_layer {fallback_layer} is out of range. Fix: choose 1..{num_layers}.")
    traits = {}
    for path in sorted(directory.glob(f"*{VECTOR_SUFFIX}")):
        name = path.name[: -len(VECTOR_SUFFIX)]
        vectors = load_vector(path, hidden_size=hidden_size, num_layers=num_layers)
        layer, source = recommended_layer(path), "layer_metrics"
        if layer is None or not 0 <= layer <= num_layers:
            layer, source = fallback_layer, "fallback_layer"
        if layer is None:
            layer, source = max(1, round(0.6 * num_layers)), "depth"
        if lm is not None:
            norms = layer_norms(path, model=model, lm=lm, tokenizer=tokenizer)
        else:
            norms = stored_norms(path)
        norms = None if norms is None else tuple(norms)
        traits[name] = Trait(
            name,
            path,
            vectors,
            layer,
            source,
            norms,
            recommendation(path),
            bounds_meta(path, lm, tokenizer, model),
        )
    if not traits:
        raise ValueError(
            f"{directory} holds no <trait>{VECTOR_SUFFIX} files. Fix: run `persona extract` for the served model, "
            "or point --vectors at the folder it wrote."
        )
    return traits


def bounds_meta(path: Path, lm, tokenizer, model: str | None) -> dict:
    """The sidecar that request bounds read, read once: with the loaded model, the neutral percentiles are measured
    (and cached beside the file) when neither the sidecar nor the cache has them, so ``"neutral:p99"`` always
    resolves; without it, whatever is stored."""
    from persona.vectors import load_metadata
    from persona.vectors.neutral_ranges import neutral_percentiles
    from persona.vectors.ranges import NEUTRAL_KEY, stored_neutral

    meta = dict(load_metadata(path))
    record = (
        neutral_percentiles(path, model=model, lm=lm, tokenizer=tokenizer)
        if lm is not None
        else stored_neutral(path, meta, model)
    )
    if record is not None:
        meta[NEUTRAL_KEY] = record
    return meta


@dataclass(frozen=True, eq=False)
class MonitorTarget:
    trait: str
    layer: int
    direction: Tensor = field(repr=False)  # [hidden]


@dataclass
class ResolvedPersona:
    """A request's ``persona`` field turned into what the engine applies, plus an echo for the reply."""

    interventions: RowInterventions = field(default_factory=RowInterventions)
    monitor: tuple[MonitorTarget, ...] = ()
    applied: dict = field(default_factory=lambda: {"steer": [], "ablate": []})
    gated: dict[int, tuple[str, int]] = field(default_factory=dict)
    """Index in ``interventions.specs`` of each conditional entry -> (``"steer"`` | ``"ablate"``, its place in
    ``applied[kind]``): where the reply says whether it fired."""


def _trait(traits: dict[str, Trait], name: str, param: str) -> Trait:
    if name not in traits:
        raise ApiError(
            404,
            f"{param}: unknown trait {name!r}. This server has: {', '.join(sorted(traits))} (see /v1/models).",
            param=param,
            code="trait_not_found",
        )
    return traits[name]


def _layer(layer: int | None, trait: Trait, num_layers: int, param: str) -> int:
    if layer is None:
        return trait.default_layer
    if not 0 <= layer <= num_layers:
        raise ApiError(
            400,
            f"{param}={layer} is out of range: the model has {num_layers} blocks. Fix: choose 0..{num_layers} "
            "(0 = embedding output, L = output of block L-1), or leave it out for the trait's default layer.",
            param=param,
            code="layer_out_of_range",
        )
    return layer


def _ablation_layers(item: AblateItem, trait: Trait, num_layers: int, param: str) -> list[int]:
    if item.layer == "all":
        return list(range(1, num_layers + 1))
    return [_layer(item.layer, trait, num_layers, f"{param}.layer")]


def _strength(item: SteerItem, trait: Trait, layer: int, param: str) -> tuple[float, float | None, str]:
    """(coef, dose, "request" | "recommended") of one steer entry; the dose guard answers 400."""
    from persona.vectors.dose import DEFAULT_MAX_DOSE, coef_to_dose, dose_to_coef

    if item.coef is not None and item.dose is not None:
        raise ApiError(
            400, f"{param}: give coef or dose, not both.", param=f"{param}.dose", code="coef_and_dose"
        )
    advice, source, dose = trait.recommended, "request", item.dose
    if item.coef is None and dose is None:
        if advice is None or int(advice["layer"]) != layer:
            raise ApiError(
                400,
                f"{param}: no coef or dose, and trait {trait.name!r} has no calibrated recommendation for layer "
                f"{layer}. Fix: pass coef or dose (or run `persona calibrate` on its vector).",
                param=f"{param}.dose",
                code="strength_missing",
            )
        dose, source = float(advice["dose"]), "recommended"
    if trait.norms is None:
        if dose is not None:
            raise ApiError(400, f"{param}.dose: trait {trait.name!r} has no residual norms. Fix: pass coef.",
                           param=f"{param}.dose", code="dose_unavailable")  # fmt: skip
        return item.coef, None, source
    norm = trait.norms[layer]
    if dose is None:
        return item.coef, coef_to_dose(item.coef, trait.direction(layer), norm), source
    limit = (trait.calibrated_doses() or {}).get(layer, DEFAULT_MAX_DOSE)
    if source == "request" and not item.force and abs(dose) > limit + 1e-12:
        raise ApiError(
            400,
            f"{param}.dose={dose:g} exceeds the dose limit {limit:.3g} of trait {trait.name!r} at layer {layer}. "
            'Fix: a smaller dose, or "force": true.',
            param=f"{param}.dose",
            code="dose_above_limit",
        )
    return dose_to_coef(dose, trait.direction(layer), norm), dose, source


def _bound(value, trait: Trait, layer: int, param: str) -> float | None:
    """A number, or a recorded percentile of ``trait`` at ``layer`` (400 naming ``param`` if it has none)."""
    from persona.vectors.ranges import resolve_bound

    try:
        return resolve_bound(value, path=trait.path, meta=trait.meta, layer=layer, field=param)
    except ValueError as error:
        raise ApiError(400, str(error), param=param, code="invalid_bound") from None


def _gate(when: WhenItem | None, traits, num_layers: int, layer: int, param: str) -> tuple[Gate | None, dict]:
    """A steer or ablate entry's ``when`` -> (Gate on the condition trait's vector, its echo for the reply)."""
    if when is None:
        return None, {}
    param = f"{param}.when"
    trait = _trait(traits, when.trait, f"{param}.trait")
    gate_layer = layer if when.layer is None else _layer(when.layer, trait, num_layers, f"{param}.layer")
    if gate_layer > layer:
        raise ApiError(
            400,
            f"{param}.layer={gate_layer} comes after the entry's layer {layer}: the gate decides at prefill before "
            f"the entry applies. Fix: choose a layer <= {layer}, or leave it out (the entry's layer).",
            param=f"{param}.layer",
            code="gate_after_entry",
        )
    if (when.above is None) == (when.below is None):
        raise ApiError(400, f"{param}: give exactly one of above or below. Fix: e.g. \"above\": \"p95\".",
                       param=f"{param}.above", code="gate_threshold")  # fmt: skip
    side = "above" if when.above is not None else "below"
    threshold = _bound(getattr(when, side), trait, gate_layer, f"{param}.{side}")
    gate = Gate(gate_layer, trait.vectors, **{side: threshold})
    echo = {"trait": trait.name, "layer": gate_layer, side: threshold, "requested": getattr(when, side)}
    return gate, echo


def _steer_entries(fields: PersonaFields, traits, num_layers: int) -> tuple[list, list]:
    specs, echo = [], []
    for index, item in enumerate(fields.steer):
        param = f"persona.steer.{index}"
        trait = _trait(traits, item.trait, f"{param}.trait")
        advised = item.layer is None and trait.recommended is not None
        layer = (
            int(trait.recommended["layer"])
            if advised
            else _layer(item.layer, trait, num_layers, f"{param}.layer")
        )
        coef, dose, source = _strength(item, trait, layer, param)
        gate, when = _gate(item.when, traits, num_layers, layer, param)
        specs.append(SteeringSpec(layer, trait.vectors, coef, positions=item.positions, when=gate))
        echo.append(
            {"trait": trait.name, "coef": coef, "dose": dose, "layer": layer, "positions": item.positions,
             "strength": source, "layer_from": "recommended" if advised else ("request" if item.layer is not None else "default"),
             **({"when": when} if when else {})}
        )  # fmt: skip
    return specs, echo


def _cap_entries(fields: PersonaFields, traits, num_layers: int) -> tuple[list[CapSpec], list]:
    specs, echo = [], []
    for index, item in enumerate(fields.cap):
        param = f"persona.cap.{index}"
        trait = _trait(traits, item.trait, f"{param}.trait")
        layer = _layer(item.layer, trait, num_layers, f"{param}.layer")
        asked = (
            {"lo": item.lo, "hi": item.hi}
            if (item.lo, item.hi) != (None, None)
            else {"lo": None, "hi": "p99"}
        )
        lo = _bound(asked["lo"], trait, layer, f"{param}.lo")
        hi = _bound(asked["hi"], trait, layer, f"{param}.hi")
        if lo is not None and hi is not None and lo > hi:
            raise ApiError(400, f"{param}: lo={lo:g} is above hi={hi:g}. Fix: pass lo <= hi.",
                           param=f"{param}.lo", code="invalid_bound")  # fmt: skip
        specs.append(CapSpec(layer, trait.vectors, lo, hi, positions=item.positions))
        echo.append({"trait": trait.name, "layer": layer, "lo": lo, "hi": hi, "positions": item.positions,
                     "requested": asked})  # fmt: skip
    return specs, echo


def _ablate_entries(fields: PersonaFields, traits, num_layers: int) -> tuple[dict, list, list]:
    """(ungated ablations per layer, orthonormalised; gated (AblationSpec, its place in the echo); echo)."""
    per_layer: dict[int, list[Tensor]] = {}
    gated, echo = [], []
    for index, raw in enumerate(fields.ablate):
        item = AblateItem(trait=raw) if isinstance(raw, str) else raw
        param = f"persona.ablate.{index}"
        trait = _trait(traits, item.trait, param)
        if item.when is not None and item.layer == "all":
            raise ApiError(400, f'{param}.layer="all" cannot be gated: a gate reads one layer before its entry. '
                           "Fix: give one layer, or drop when.", param=f"{param}.layer", code="gate_layer")  # fmt: skip
        layers = _ablation_layers(item, trait, num_layers, param)
        gate, when = _gate(item.when, traits, num_layers, layers[0], param)
        if gate is not None:
            gated.append((AblationSpec(layers[0], trait.direction(layers[0]), when=gate), len(echo)))
        else:
            for layer in layers:
                per_layer.setdefault(layer, []).append(trait.direction(layer))
        echo.append({"trait": trait.name, "layers": layers, **({"when": when} if when else {})})
    ablations = {}
    for layer, directions in per_layer.items():
        try:
            ablations[layer] = orthonormalize(torch.stack(directions))
        except ValueError:
            raise ApiError(400, f"persona.ablate: the directions at layer {layer} are all zero.") from None
    return ablations, gated, echo


def _overlaps(steer_specs: list, steer_echo: list) -> list[dict]:
    """The cosines of the steer entries' vectors at each layer with two or more (what orthogonalise removes)."""
    try:
        _, overlaps = orthogonalise_specs(steer_specs)
    except ValueError as error:
        raise ApiError(400, f"persona.orthogonalise: {error} Fix: drop one of the dependent steer entries.",
                       param="persona.orthogonalise", code="dependent_directions") from None  # fmt: skip
    found = []
    for layer, cosines in overlaps.items():
        names = [
            e["trait"]
            for s, e in zip(steer_specs, steer_echo, strict=True)
            if s.layer == layer and s.coef != 0
        ]
        found.append(
            {
                "layer": layer,
                "traits": names,
                "cosines": [[round(float(c), 6) for c in row] for row in cosines],
            }
        )
    return found


def resolve_persona(
    fields: PersonaFields | None, traits: dict[str, Trait], num_layers: int
) -> ResolvedPersona:
    """Validate a request's persona field against the loaded traits: 404 unknown trait, 400 bad layer or bound.

    Order at each layer: the plain ablations, then the gated ablations, the steer entries, the caps (a cap is the
    last word on its projection)."""
    if fields is None:
        return ResolvedPersona()
    steer_specs, steer_echo = _steer_entries(fields, traits, num_layers)
    ablations, gated_ablations, ablate_echo = _ablate_entries(fields, traits, num_layers)
    cap_specs, cap_echo = _cap_entries(fields, traits, num_layers)
    specs = [spec for spec, _ in gated_ablations] + steer_specs + cap_specs
    gated = {index: ("ablate", place) for index, (_, place) in enumerate(gated_ablations)}
    gated.update(
        {
            len(gated_ablations) + i: ("steer", i)
            for i, spec in enumerate(steer_specs)
            if spec.when is not None
        }
    )
    applied = {"steer": steer_echo, "ablate": ablate_echo}
    if fields.cap:
        applied["cap"] = cap_echo
    if fields.orthogonalise:
        applied["orthogonalised"] = _overlaps(steer_specs, steer_echo)
    monitor = []
    for index, name in enumerate(dict.fromkeys(fields.monitor)):
        trait = _trait(traits, name, f"persona.monitor.{index}")
        monitor.append(MonitorTarget(trait.name, trait.default_layer, trait.direction(trait.default_layer)))
    interventions = RowInterventions(specs, ablations, orthogonalise=fields.orthogonalise)
    return ResolvedPersona(interventions, tuple(monitor), applied, gated)
