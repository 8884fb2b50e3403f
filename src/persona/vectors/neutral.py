"""The built-in neutral text set, and the one cache for what is measured on it for a vector file, beside the file.

Two things are measured on :data:`NEUTRAL_TEXTS` (~30 everyday sentences with no trait in them): the residual norms
a dose is relative to (:func:`persona.vectors.dose.layer_norms`) and the neutral projection percentiles a
``"neutral:p99"`` cap or gate bound reads (:mod:`persona.vectors.neutral_ranges`).

Both follow one path: the vector's sidecar (extraction records them from its own forward), else a JSON cache beside
the vector file (``<stem>.<what>.json``, written atomically and keyed by the texts, the model and whatever else the
value depends on, so a changed input is measured again), else measured once with the model and cached there.
No torch import at module level: commands read stored values while checking their arguments.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from persona.core.errors import PersonaError
from persona.core.store import read_json, write_json

NEUTRAL_TEXTS = Path(__file__).with_name("neutral_texts.txt")


def neutral_texts() -> list[str]:
    """The built-in neutral sentences (comments and blank lines skipped)."""
    lines = NEUTRAL_TEXTS.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def texts_digest() -> str:
    return hashlib.sha256("\n".join(neutral_texts()).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """The vector file's content hash: a cache measured on another file's vectors is not this one's."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cache_path(vector_path: str | Path, what: str) -> Path:
    """Where a measurement for a vector file without it in its sidecar is cached: ``<stem>.<what>.json`` beside it."""
    vector_path = Path(vector_path)
    return vector_path.with_name(f"{vector_path.stem}.{what}.json")


def read_cache(vector_path: str | Path, what: str, field: str, *, model: str | None, key: dict):
    """The cached ``field`` when the cache's texts, ``key`` and model (when ``model`` is given) match, else None."""
    cache = cache_path(vector_path, what)
    if not cache.is_file():
        return None
    cached = read_json(cache, what=f"{what} cache")
    wanted = {"texts_sha256": texts_digest(), **key}
    if any(cached.get(name) != value for name, value in wanted.items()):
        return None
    return cached.get(field) if model in (None, cached.get("model")) else None


def write_cache(
    vector_path: str | Path, what: str, field: str, value, *, model: str | None, key: dict
) -> None:
    """Cache ``value`` beside the vector file (atomic: a killed run leaves no half file); a read-only folder only
    warns, and the value is measured again next time."""
    record = {
        "model": model,
        "texts": NEUTRAL_TEXTS.name,
        "texts_sha256": texts_digest(),
        **key,
        field: value,
    }
    try:
        write_json(cache_path(vector_path, what), record)
    except OSError as error:
        logging.getLogger(__name__).warning("could not cache %s beside %s: %s", what, vector_path, error)


def model_to_measure(vector_path, field: str, *, model, lm, tokenizer, flag: str, why: str):
    """``(lm, tokenizer)`` to measure ``field`` with: the loaded ones, else ``model`` loaded here; one line if none."""
    if lm is None and model is None:
        raise PersonaError(
            f"{vector_path}: its sidecar has no {field} ({why}) and no model was given to measure them. "
            f"Fix: pass {flag} (the model the vector came from), or re-run `persona extract`."
        )
    if lm is None:
        from persona.models import load_model, load_tokenizer

        lm, tokenizer = load_model(model), load_tokenizer(model)
    if tokenizer is None:
        raise PersonaError(
            f"{vector_path}: its sidecar has no {field} and there is no tokenizer to measure them. Fix: "
            "re-run `persona extract`, or use a module with a .tokenizer."
        )
    return lm, tokenizer
