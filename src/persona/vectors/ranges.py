"""Projection ranges from data: the percentiles extraction records, and bounds given as numbers or percentiles.

Extraction projects every negative (trait-free) example's mean activation of a file's kind on that file's unit
vector, at every layer, and records the percentiles below in the sidecar. A capping range or a gate threshold is
then a number (the same unit: scalar projection on the unit vector) or a percentile name such as ``"p99"``.
No torch import here: commands resolve bounds while checking their arguments.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from persona.core.store import sidecar_path

PROJECTION_PERCENTILES: tuple[int, ...] = (1, 5, 25, 50, 75, 95, 99)
PERCENTILES_KEY = "negative_projection_percentiles"
PERCENTILE_NAME = re.compile(r"^p(\d+(?:\.\d+)?)$")


def percentile_record(values_per_layer) -> dict:
    """The sidecar entry: ``values_per_layer [num_layers + 1, len(PROJECTION_PERCENTILES)]`` (nested lists ok)."""
    return {
        "percentiles": list(PROJECTION_PERCENTILES),
        "per_layer": [[float(value) for value in row] for row in values_per_layer],
        "of": "each negative example's mean activation of the file's kind, projected on the unit vector of "
        "its layer (per-example means: token-level projections spread wider)",
    }


def _recorded(path: Path, meta: dict, field: str, value: str) -> dict:
    record = meta.get(PERCENTILES_KEY)
    if not isinstance(record, dict) or "per_layer" not in record:
        raise ValueError(
            f"{field}={value!r}: {sidecar_path(path)} records no {PERCENTILES_KEY} (the vector was extracted "
            "before persona recorded them, or has no sidecar). Fix: re-run `persona extract` for this trait, or "
            f"give {field} as a number."
        )
    return record


def resolve_bound(
    value, *, path: str | Path | None, meta: dict | None, layer: int, field: str
) -> float | None:
    """``value`` as a number in projection units: None stays None, a number is checked, ``"p<q>"`` is looked up.

    ``meta``: the vector's sidecar (``load_metadata(path)``); ``path`` only names it in errors.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(
            f"{field}={value!r} is not a bound. Fix: pass a number or a percentile such as 'p99'."
        )
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
                f"{field}={value!r} is neither a number nor a percentile. Fix: pass e.g. 2.5 or 'p99'."
            ) from None
    where = Path(path) if path is not None else Path("<vector>")
    record = _recorded(where, meta or {}, field, text)
    wanted = float(match.group(1))
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
