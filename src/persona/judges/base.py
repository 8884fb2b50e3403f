"""What every judge returns and promises: ``JudgeScore``, the ``Judge`` protocol, shared helpers.

A judge turns one filled-in judge prompt into one score on 0-100 (every aggregation is mapped onto
that range), or ``None`` with the reason in ``method``: the judge refused, its answer was not a
number, or the call finally failed. A made-up number is never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tqdm.auto import tqdm

from persona.core.constants import MIN_MASS

LOGPROBS = "logprobs"  # aggregated from the first token's top logprobs (the seed's method)
DIGIT_CHAIN = "digit_chain"  # local judge: whole-number probabilities chained over digit tokens
PARSED = "parsed"  # a short greedy completion was parsed (servers whose tokenizer splits numbers)
REFUSAL = "refusal"  # the judge answered REFUSAL (the seed's prompts ask for it when the reply refused)
FAILED = "failed"  # the call finally failed; ``error`` says why
METHODS = (LOGPROBS, DIGIT_CHAIN, PARSED, REFUSAL, FAILED)


@dataclass(frozen=True)
class JudgeScore:
    score: float | None  # 0-100; None = refusal, unscorable, or the call finally failed
    method: str  # one of METHODS
    error: str | None = None  # why, when failed (never a secret)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"JudgeScore.method={self.method!r} is not one of {METHODS}.")


@runtime_checkable
class Judge(Protocol):
    name: str  # e.g. "openai:gpt-4.1-mini" or "local:smollm2-135m": cache key and CSV provenance

    def score(self, prompts: Sequence[str]) -> list[JudgeScore]:
        """One filled judge prompt -> one score, in the same order."""
        ...


def score_with_cache(
    prompts: Sequence[str],
    compute: Callable[[list[str]], Iterable[tuple[int, JudgeScore]]],
    *,
    cache=None,
    judge_name: str,
    aggregation: str,
) -> list[JudgeScore]:
    """Answer from ``cache`` where possible and ``compute`` each distinct missing prompt once.

    ``compute(missing)`` yields ``(index into missing, score)`` as results arrive, in any order; each success
    is stored at once, so an interrupted run keeps what it paid for. Failures are not stored: a re-run
    retries exactly those.
    """
    prompts = list(prompts)
    found = cache.get_many(judge_name, aggregation, prompts) if cache is not None else {}
    missing = list(dict.fromkeys(p for p in prompts if p not in found))
    progress = tqdm(
        total=len(missing), desc=f"judge {judge_name}", unit="prompt", disable=len(missing) < 8, leave=False
    )
    for index, result in compute(missing) if missing else ():
        progress.update()
        found[missing[index]] = result
        if cache is not None and result.method != FAILED:
            cache.put_many(judge_name, aggregation, {missing[index]: result})
    progress.close()
    absent = [p for p in missing if p not in found]
    if absent:
        raise RuntimeError(
            f"judge {judge_name!r} returned no score for {len(absent)} of {len(missing)} prompts"
        )
    return [found[p] for p in prompts]


DEFAULT_LOCAL_MODEL = "smollm2-135m"


def judge_name(spec: str = "local", *, min_mass: float | None = None) -> str:
    """The name a judge built from ``spec`` records beside its scores (without building it)."""
    if spec == "local" or spec.startswith("local:"):
        name = f"local:{spec.partition(':')[2] or DEFAULT_LOCAL_MODEL}"
        return name if min_mass is None or min_mass == MIN_MASS else f"{name}@min_mass={min_mass:g}"
    return f"openai:{spec.removeprefix('openai:')}"
