"""Pure functions from a judge's answer distribution to a 0-100 score (no model, no network).

``probs`` maps an answer string (a top-logprob token, or a whole number the local judge chained
together) to its probability. Keys are compared with surrounding whitespace stripped, and keys that
collide after stripping (``"8"`` and ``" 8"``) are summed, where the seed let one overwrite the other.

- ``0_100`` (the seed's): probability-weighted mean over keys that are integers 0..100; ``None``
  when less than ``MIN_MASS`` of the probability sits on such numbers.
- ``0_10``: the same over 0..10, times 10 so that every aggregation answers on 0-100.
- ``binary``: P(yes) / (P(yes) + P(no)) x 100 (case-insensitive), ``None`` under ``MIN_MASS``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from persona.core.constants import MIN_MASS

AGGREGATIONS = ("0_100", "0_10", "binary")
REFUSAL_WORD = "REFUSAL"
YES_WORDS = ("yes",)
NO_WORDS = ("no",)
_INTEGER = re.compile(r"[0-9]+")
_LEADING_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)")


def check_aggregation(aggregation: str) -> str:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not supported. Fix: use one of {AGGREGATIONS}.")
    return aggregation


def max_value(aggregation: str) -> int:
    """Largest integer answer the aggregation counts (binary has no integers)."""
    return {"0_100": 100, "0_10": 10}.get(check_aggregation(aggregation), 0)


def logprobs_to_probs(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(token, logprob) pairs -> stripped token -> summed probability."""
    probs: dict[str, float] = {}
    for token, logprob in pairs:
        key = token.strip()
        probs[key] = probs.get(key, 0.0) + math.exp(logprob)
    return probs


def _stripped(probs: Mapping[str, float]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for key, p in probs.items():
        merged[key.strip()] = merged.get(key.strip(), 0.0) + float(p)
    return merged


def integer_probs(probs: Mapping[str, float], high: int) -> dict[int, float]:
    """Probability on each integer 0..high among the keys (ASCII digits only; "07" counts as 7, as in the seed)."""
    found: dict[int, float] = {}
    for key, p in _stripped(probs).items():
        if _INTEGER.fullmatch(key) and int(key) <= high:
            found[int(key)] = found.get(int(key), 0.0) + p
    return found


def _weighted_mean(found: Mapping[int, float], min_mass: float = MIN_MASS) -> float | None:
    total = sum(found.values())
    if total <= 0 or total < min_mass:
        return None
    return sum(n * p for n, p in found.items()) / total


def aggregate_0_100(probs: Mapping[str, float], min_mass: float = MIN_MASS) -> float | None:
    return _weighted_mean(integer_probs(probs, 100), min_mass)


def aggregate_0_10(probs: Mapping[str, float], min_mass: float = MIN_MASS) -> float | None:
    mean = _weighted_mean(integer_probs(probs, 10), min_mass)
    return None if mean is None else 10.0 * mean


def _word_mass(probs: Mapping[str, float], words: tuple[str, ...]) -> float:
    return sum(p for key, p in _stripped(probs).items() if key.lower() in words)


def aggregate_binary(probs: Mapping[str, float], min_mass: float = MIN_MASS) -> float | None:
    yes, no = _word_mass(probs, YES_WORDS), _word_mass(probs, NO_WORDS)
    if yes + no <= 0 or yes + no < min_mass:
        return None
    return 100.0 * yes / (yes + no)


def aggregate(
    probs: Mapping[str, float], aggregation: str = "0_100", min_mass: float = MIN_MASS
) -> float | None:
    """``min_mass=0`` scores the expected answer *given* that the judge answered with a number — for small
    local judges that put little mass on numbers at all (the seed's 0.25 floor assumes a strong API judge)."""
    return {"0_100": aggregate_0_100, "0_10": aggregate_0_10, "binary": aggregate_binary}[
        check_aggregation(aggregation)
    ](probs, min_mass)


def scorable_mass(probs: Mapping[str, float], aggregation: str = "0_100") -> float:
    """Probability on the answers the aggregation counts."""
    if check_aggregation(aggregation) == "binary":
        return _word_mass(probs, YES_WORDS + NO_WORDS)
    return sum(integer_probs(probs, max_value(aggregation)).values())


def refusal_mass(probs: Mapping[str, float]) -> float:
    """Probability on the start of "REFUSAL": keys that are case-insensitive prefixes of it, at least "REF"."""
    word = REFUSAL_WORD.lower()
    return sum(p for key, p in _stripped(probs).items() if len(key) >= 3 and word.startswith(key.lower()))


def is_refusal(probs: Mapping[str, float], aggregation: str = "0_100") -> bool:
    """The refusal dominates: more mass on "REF…" than on every scorable answer together."""
    refused = refusal_mass(probs)
    return refused > 0.0 and refused > scorable_mass(probs, aggregation)


def splits_numbers(probs: Mapping[str, float], aggregation: str = "0_100") -> bool:
    """Top tokens look like a digit-splitting tokenizer (Qwen, Llama-2, Mistral, Gemma, SmolLM): "85" shows as "8".

    Signature: 0-100 expected, at least ``MIN_MASS`` on the digits 0..9, and not one whole number 10..100
    anywhere among the top tokens. A whole-number tokenizer (OpenAI's, Llama-3's) practically always lists
    some, e.g. "10" or "20" behind a confident "0", so it keeps its logprob score. If it ever does not, the
    fallback (a parsed greedy completion) is still right, only one call dearer.
    """
    if aggregation != "0_100":
        return False
    found = integer_probs(probs, 100)
    single = sum(p for n, p in found.items() if n <= 9)
    return single >= MIN_MASS and all(n <= 9 for n in found)


def parse_score(text: str, aggregation: str = "0_100") -> tuple[float | None, bool]:
    """A short completion -> (score on 0-100 or None, refused?). A leading number ("85", "0.5"), "REF…", or yes/no.

    A greedy completion is a point estimate: where the judge's probability splits between far-apart numbers,
    servers that give logprobs for whole numbers (the seed's method) are to be preferred."""
    stripped = text.strip()
    if stripped.upper().startswith(REFUSAL_WORD[:3]):
        return None, True
    if check_aggregation(aggregation) == "binary":
        word = re.split(r"[^A-Za-z]", stripped, maxsplit=1)[0].lower()
        return (100.0 if word in YES_WORDS else 0.0 if word in NO_WORDS else None), False
    match = _LEADING_NUMBER.match(text)
    if match is None or float(match.group(1)) > max_value(aggregation):
        return None, False
    value = float(match.group(1))
    return (10.0 * value if aggregation == "0_10" else value), False
