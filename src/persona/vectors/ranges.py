"""Projection ranges from data: the percentiles extraction records, and bounds given as numbers or percentiles.

Extraction projects every negative (trait-free) example's mean activation of a file's kind on that file's unit
vector, at every layer, and records the percentiles below in the sidecar (``negative_projection_percentiles``);
it does the same for the built-in neutral texts (``neutral_projection_percentiles``, :mod:`persona.vectors.neutral_ranges`;
older files get those measured once and cached beside them). A capping range or a gate threshold is then a number
(the same unit: scalar projection on the unit vector) or a percentile name: ``"p99"`` (or ``"negative:p99"``) of the
negative examples, ``"neutral:p99"`` of the neutral texts.
No torch import here: commands resolve bounds while checking their arguments.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from persona.core.constants import VECTOR_KINDS
from persona.core.store import sidecar_path
from persona.vectors.neutral import file_digest, read_cache

PROJECTION_PERCENTILES: tuple[int, ...] = (1, 5, 25, 50, 75, 95, 99)
PERCENTILES_KEY = "negative_projection_percentiles"
NEUTRAL_KEY = "neutral_projection_percentiles"
PERCENTILE_NAME = re.compile(r"^(?:(negative|neutral):)?p(\d+(?:\.\d+)?)$")
FORMS = "a number (e.g. 2.5), 'p99' or 'negative:p99' (the trait-free examples), 'neutral:p99' (the neutral texts)"
NEGATIVE_OF = (
    "each negative example's mean activation of the file's kind, projected on the unit vector of its layer "
    "(per-example means: token-level projections spread wider)"
)


def percentile_record(values_per_layer, *, of: str = NEGATIVE_OF) -> dict:
    """The sidecar entry: ``values_per_layer [num_layers + 1, len(PROJECTION_PERCENTILES)]`` (nested lists ok)."""
    return {
        "percentiles": list(PROJECTION_PERCENTILES),
        "per_layer": [[float(value) for value in row] for row in values_per_layer],
        "of": of,
    }


def is_percentile_name(value) -> bool:
    """Whether ``value`` names a recorded percentile (``"p99"``, ``"negative:p99"``, ``"neutral:p99"``)."""
    return isinstance(value, str) and PERCENTILE_NAME.match(value.strip()) is not None


def needs_neutral(*values) -> bool:
    """Whether any of ``values`` reads the neutral percentiles (then a model may have to measure them first)."""
    return any(is_percentile_name(value) and value.strip().startswith("neutral:") for value in values)


def file_kind(vector_path: str | Path, meta: dict) -> str:
    """The vector file's kind: its sidecar's, else its name's (``…_<kind>_diff.pt``), else ``response_avg``."""
    kind = meta.get("kind")
    if kind in VECTOR_KINDS:
        return kind
    return next((k for k in VECTOR_KINDS if Path(vector_path).stem.endswith(f"{k}_diff")), "response_avg")


def stored_neutral(vector_path: str | Path | None, meta: dict, model: str | None = None) -> dict | None:
    """The vector's neutral record from its sidecar (``meta``) or the cache beside it, else None."""
    record = meta.get(NEUTRAL_KEY)
    if isinstance(record, dict) and "per_layer" in record:
        return record
    if vector_path is None or not Path(vector_path).is_file():
        return None
    key = {"vector_sha256": file_digest(vector_path), "kind": file_kind(vector_path, meta)}
    return read_cache(vector_path, "neutral", NEUTRAL_KEY, model=model, key=key)


def _recorded(path: Path | None, meta: dict, field: str, value: str, source: str) -> dict:
    where = sidecar_path(path) if path is not None else "<vector>"
    if source == "neutral":
        record = stored_neutral(path, meta)
        if record is None:
            raise ValueError(
                f"{field}={value!r}: {where} records no {NEUTRAL_KEY} and none are cached beside it (the vector was "
                "extracted before persona recorded them), and no model was given to measure them. Fix: re-run "
                "`persona extract`, pass the model (--model; in Python persona.vectors.neutral_ranges.neutral_percentiles"
                f"(path, model=...)), or give {field} as a number."
            )
        return record
    record = meta.get(PERCENTILES_KEY)
    if not isinstance(record, dict) or "per_layer" not in record:
        raise ValueError(
            f"{field}={value!r}: {where} records no {PERCENTILES_KEY} (the vector was extracted "
            "before persona recorded them, or has no sidecar). Fix: re-run `persona extract` for this trait, or "
            f"give {field} as a number."
        )
    return record


def resolve_bound(
    value, *, path: str | Path | None, meta: dict | None, layer: int, field: str
) -> float | None:
    """``value`` as a number in projection units: None stays None, a number is checked, a percentile name is
    looked up: ``"p<q>"``/``"negative:p<q>"`` in the sidecar's negative record, ``"neutral:p<q>"`` in its neutral
    record or the cache beside ``path`` (commands with a model measure a missing one first:
    :func:`persona.vectors.neutral_ranges.neutral_percentiles`).

    ``meta``: the vector's sidecar (``load_metadata(path)``); ``path`` names it in errors and finds the cache.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field}={value!r} is not a bound. Fix: pass {FORMS}.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(
                f"{field}={value!r} is not finite. Fix: pass a finite number, or None for no bound."
            )
        return float(value)
    text = str(value).strip()
    match = PERCENTILE_NAME.match(text)
    if match is None:
        try:
            return resolve_bound(float(text), path=path, meta=meta, layer=layer, field=field)
        except ValueError:
            raise ValueError(
                f"{field}={value!r} is neither a number nor a recorded percentile. Fix: pass {FORMS}."
            ) from None
    where = Path(path) if path is not None else Path("<vector>")
    source = match.group(1) or "negative"
    record = _recorded(None if path is None else where, meta or {}, field, text, source)
    wanted = float(match.group(2))
    recorded = [float(q) for q in record["percentiles"]]
    if wanted not in recorded:
        names = ", ".join(f"p{q:g}" for q in recorded)
        raise ValueError(
            f"{field}={value!r}: {sidecar_path(where)} records {names}. Fix: use one of them or a number."
        )
    rows = record["per_layer"]
    if not 0 <= layer < len(rows):
        raise ValueError(
            f"{field}={value!r}: {sidecar_path(where)} has percentiles for layers 0..{len(rows) - 1}, not {layer}. "
            "Fix: choose a layer the vector file covers."
        )
    return float(rows[layer][recorded.index(wanted)])
