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
from persona.serve.schema import AblateItem, ApiError, PersonaFields
from persona.steering import SteeringSpec
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

    def direction(self, layer: int) -> Tensor:
        return self.vectors[layer]

    def describe(self) -> dict:
        return {
            "default_layer": self.default_layer,
            "default_layer_source": self.layer_source,
            "vector_file": self.path.name,
            "vector_norm_at_default_layer": round(float(self.vectors[self.default_layer].norm()), 4),
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
    directory: str | Path, *, num_layers: int, hidden_size: int, fallback_layer: int | None = None
) -> dict[str, Trait]:
    """Every ``<trait>_response_avg_diff.pt`` in ``directory``, checked against the model's shape."""
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
        traits[name] = Trait(name, path, vectors, layer, source)
    if not traits:
        raise ValueError(
            f"{directory} holds no <trait>{VECTOR_SUFFIX} files. Fix: run `persona extract` for the served model, "
            "or point --vectors at the folder it wrote."
        )
    return traits


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


def resolve_persona(
    fields: PersonaFields | None, traits: dict[str, Trait], num_layers: int
) -> ResolvedPersona:
    """Validate a request's persona field against the loaded traits: 404 unknown trait, 400 bad layer."""
    if fields is None:
        return ResolvedPersona()
    specs, steer_echo = [], []
    for index, item in enumerate(fields.steer):
        param = f"persona.steer.{index}"
        trait = _trait(traits, item.trait, f"{param}.trait")
        layer = _layer(item.layer, trait, num_layers, f"{param}.layer")
        specs.append(SteeringSpec(layer, trait.vectors, item.coef, positions=item.positions))
        steer_echo.append(
            {"trait": trait.name, "coef": item.coef, "layer": layer, "positions": item.positions}
        )
    per_layer: dict[int, list[Tensor]] = {}
    ablate_echo = []
    for index, raw in enumerate(fields.ablate):
        item = AblateItem(trait=raw) if isinstance(raw, str) else raw
        trait = _trait(traits, item.trait, f"persona.ablate.{index}")
        layers = _ablation_layers(item, trait, num_layers, f"persona.ablate.{index}")
        for layer in layers:
            per_layer.setdefault(layer, []).append(trait.direction(layer))
        ablate_echo.append({"trait": trait.name, "layers": layers})
    ablations = {}
    for layer, directions in per_layer.items():
        try:
            ablations[layer] = orthonormalize(torch.stack(directions))
        except ValueError:
            raise ApiError(400, f"persona.ablate: the directions at layer {layer} are all zero.") from None
    monitor = []
    for index, name in enumerate(dict.fromkeys(fields.monitor)):
        trait = _trait(traits, name, f"persona.monitor.{index}")
        monitor.append(MonitorTarget(trait.name, trait.default_layer, trait.direction(trait.default_layer)))
    applied = {"steer": steer_echo, "ablate": ablate_echo}
    return ResolvedPersona(RowInterventions(specs, ablations), tuple(monitor), applied)
