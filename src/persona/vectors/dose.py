"""Steering strength in a unit that transfers: the dose.

``dose = coef * ||v_L|| / mean ||h_L||``, where ``mean ||h_L||`` is the model's typical residual norm at layer
L (every real token but each text's first, an attention sink). A dose is the size of the push relative to
the stream it is added to, so "dose 0.3" means the same at any layer, for any trait's vector and on any model,
where a raw coef does not (vector norms differ by orders of magnitude). It is a unit conversion at the
boundary: a dose becomes ``coef = dose * mean ||h_L|| / ||v_L||`` — exactly ``SteeringSpec(relative=True,
reference_norm=mean ||h_L||, coef=dose).scale()`` — and the hooks see one coefficient as always.

Where the norms come from (:func:`layer_norms`): the vector's sidecar (``mean_residual_norms``, recorded by
extraction from the forward it already runs), else a cache beside the vector file (``<stem>.norms.json``), else
measured once on :data:`~persona.vectors.neutral.NEUTRAL_TEXTS` (~30 everyday sentences shipped in the package)
and cached there (:mod:`persona.vectors.neutral`: the one cache for what is measured on those texts).

The guard (:func:`check_dose`): a dose above the layer's limit is refused unless forced. The limit is the
dose ``persona calibrate`` found at its coherence target for that layer when the sidecar has one, else
:data:`DEFAULT_MAX_DOSE`.
"""

from __future__ import annotations

import math
from pathlib import Path

from persona.core.errors import PersonaError
from persona.core.store import read_json, sidecar_path
from persona.vectors.neutral import (  # noqa: F401  (NEUTRAL_TEXTS re-exported: its old home)
    NEUTRAL_TEXTS,
    cache_path,
    model_to_measure,
    neutral_texts,
    read_cache,
    write_cache,
)

DEFAULT_MAX_DOSE = 1.0
"""Largest |dose| accepted without ``--allow_high_dose`` / ``"force": true`` where no calibration says
otherwise. The vLLM steering plugins measured answers collapsing near 1.9 and staying safe near 0.7; on the
embedded SmolLM2-135M the perplexity-ratio coherence is far below 80 at dose 1 (README, "Doses")."""

NORMS_FIELD = "mean_residual_norms"


def norms_cache_path(vector_path: str | Path) -> Path:
    """Where norms measured for a vector file without them are cached: ``<stem>.norms.json`` beside it."""
    return cache_path(vector_path, "norms")


def stored_norms(vector_path: str | Path, model: str | None = None) -> list[float] | None:
    """The vector's per-layer mean residual norms from its sidecar or the cache beside it, else None."""
    norms = _sidecar(vector_path).get(NORMS_FIELD) or read_cache(
        vector_path, "norms", NORMS_FIELD, model=model, key={}
    )
    return [float(value) for value in norms] if norms else None


def layer_norms(
    vector_path: str | Path, *, model: str | None, lm=None, tokenizer=None, flag: str = "--model"
) -> list[float]:
    """Per-layer mean residual norms ``[num_layers + 1]`` for a vector file: stored, else measured and cached.

    Measuring needs the model: ``lm`` + ``tokenizer`` when loaded, else ``model`` (a name) is loaded here.
    """
    norms = stored_norms(vector_path, model)
    if norms is not None:
        return norms
    lm, tokenizer = model_to_measure(vector_path, NORMS_FIELD, model=model, lm=lm, tokenizer=tokenizer, flag=flag,
                                     why="extracted before doses existed")  # fmt: skip
    from persona.hooks import locate_blocks
    from persona.vectors.norms import mean_residual_norms

    layers = list(range(locate_blocks(lm).num_layers + 1))
    norms = [round(value, 6) for value in mean_residual_norms(lm, tokenizer, neutral_texts(), layers)]
    write_cache(vector_path, "norms", NORMS_FIELD, norms, model=model, key={})
    return [float(value) for value in norms]


def _direction_norm(direction) -> float:
    import torch

    return float(torch.as_tensor(direction).double().norm())


def dose_to_coef(dose: float, direction, norm: float) -> float:
    """The raw coefficient of ``dose`` for this direction ``[hidden]`` and layer norm — the arithmetic of
    ``SteeringSpec(relative=True, reference_norm=norm, coef=dose).scale()``, so both give identical tokens."""
    size = _direction_norm(direction)
    if size == 0:
        raise PersonaError(
            "the vector's row at this layer is all zeros, so no dose reaches it. Fix: another layer."
        )
    return float(dose) * norm / size


def coef_to_dose(coef: float, direction, norm: float) -> float:
    """The dose of a raw coefficient: ``coef * ||v_L|| / mean ||h_L||``."""
    return float(coef) * _direction_norm(direction) / norm


def _sidecar(vector_path: str | Path) -> dict:
    side = sidecar_path(vector_path)
    return read_json(side, what="vector sidecar") if side.is_file() else {}


def recommendation(vector_path: str | Path) -> dict | None:
    """The sidecar's ``recommended`` {layer, dose, coef, ...} written by ``persona calibrate``, or None."""
    return _sidecar(vector_path).get("recommended")


def dose_limit(vector_path: str | Path, layer: int) -> tuple[float, str]:
    """(limit, where it comes from): the calibrated dose at ``layer`` if ``persona calibrate`` found one."""
    calibrated = (_sidecar(vector_path).get("calibration") or {}).get("layers", {}).get(str(layer))
    if calibrated and calibrated.get("dose") is not None:
        return float(calibrated["dose"]), f"calibrated at layer {layer} (coherence target)"
    return DEFAULT_MAX_DOSE, "the default limit"


def check_dose(dose: float, limit: float, source: str, *, flag: str, force: str) -> None:
    """Refuse ``|dose| > limit`` (one line naming the flag, the limit and the way past it)."""
    if not math.isfinite(dose):
        raise PersonaError(f"{flag}={dose!r} is not finite. Fix: pass a finite dose, e.g. 0.3.")
    if abs(dose) > limit + 1e-12:
        raise PersonaError(
            f"{flag}={dose:g} exceeds the dose limit {limit:.3g} ({source}); answers fall apart past it. "
            f"Fix: a smaller dose, or {force} to steer that hard anyway."
        )


def one_of(coef, dose, *, coef_flag: str, dose_flag: str) -> None:
    """A coefficient or a dose, never both."""
    if coef is not None and dose is not None:
        raise PersonaError(
            f"{coef_flag} and {dose_flag} were both given. Fix: pass one — {dose_flag} (relative to the layer's "
            f"residual norm, transfers across layers and models) or {coef_flag} (raw multiplier)."
        )


def resolve(
    vector_path, direction, layer: int, norms: list[float], *, coef=None, dose=None, force=False,
    flags=("--coef", "--dose", "--allow_high_dose"),
) -> tuple[float, float]:  # fmt: skip
    """(coef, dose) from exactly one of them; a dose is checked against the guard first."""
    coef_flag, dose_flag, force_flag = flags
    one_of(coef, dose, coef_flag=coef_flag, dose_flag=dose_flag)
    norm = norms[layer]
    if dose is not None:
        if not math.isfinite(float(dose)):
            raise PersonaError(f"{dose_flag}={dose!r} is not finite. Fix: pass a finite dose, e.g. 0.3.")
        if not force:
            check_dose(float(dose), *dose_limit(vector_path, layer), flag=dose_flag, force=force_flag)
        return dose_to_coef(dose, direction, norm), float(dose)
    return float(coef), coef_to_dose(coef, direction, norm)
