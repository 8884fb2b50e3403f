"""How hard a command steers: a raw ``--coef`` or a ``--dose`` (see :mod:`persona.vectors.dose`), at a ``--layer`` —
or, when neither strength nor layer is given, the recommendation ``persona calibrate`` wrote into the vector's
sidecar. Shared by ``generate`` and ``steer-eval``; the result always carries both units."""

from __future__ import annotations

from dataclasses import dataclass

from persona.core.errors import PersonaError


@dataclass(frozen=True)
class Strength:
    layer: int
    coef: float
    dose: float
    source: str  # "--coef", "--dose" or "recommended"

    def describe(self) -> str:
        told = (
            "the calibrated recommendation in the vector's sidecar"
            if self.source == "recommended"
            else self.source
        )
        return f"layer {self.layer}, coef {self.coef:.4g} = dose {self.dose:.4g} (from {told})"


def recommended_or_given(vector_path, layer, strength_given: bool) -> tuple[int | None, float | None, bool]:
    """(layer, dose, used): the sidecar's recommendation fills a missing layer and a missing strength."""
    from persona.vectors.dose import recommendation

    advice = recommendation(vector_path)
    if advice is None or (layer is not None and strength_given):
        return layer, None, False
    use_layer = layer is None
    use_dose = not strength_given and (use_layer or int(advice["layer"]) == layer)
    return (int(advice["layer"]) if use_layer else layer), (float(advice["dose"]) if use_dose else None), True


def resolve_strength(
    model: str, vector_path: str, layer: int | None, *, coef=None, dose=None, allow_high_dose=False,
    flags=("--coef", "--dose", "--allow_high_dose"),
) -> Strength:  # fmt: skip
    """Layer, coef and dose for one steered run (the vector file is already checked against the model)."""
    from persona.vectors import load_vector
    from persona.vectors.dose import layer_norms, one_of, resolve

    coef_flag, dose_flag, _ = flags
    one_of(coef, dose, coef_flag=coef_flag, dose_flag=dose_flag)
    layer, advised_dose, advised = recommended_or_given(
        vector_path, layer, coef is not None or dose is not None
    )
    source = "recommended" if advised else (dose_flag if dose is not None else coef_flag)
    if advised_dose is not None:
        dose = advised_dose
    if layer is None or (coef is None and dose is None):
        why = "is for another layer" if advised else "is missing"
        raise PersonaError(
            f"Steering with {vector_path} needs --layer and {coef_flag} or {dose_flag}, and the calibrated "
            f"recommendation in its sidecar {why}. Fix: pass them, or run `persona calibrate --vector_path "
            f"{vector_path}` first."
        )
    vector = load_vector(vector_path)
    norms = layer_norms(vector_path, model=model)
    coef, dose = resolve(
        vector_path, vector[layer], layer, norms, coef=coef, dose=dose, force=allow_high_dose or advised_dose is not None,
        flags=flags,
    )  # fmt: skip
    return Strength(layer, coef, dose, source)
