"""Judges: one filled judge prompt -> one 0-100 score, from an OpenAI-compatible server or a local model.

judge = make_judge("openai:gpt-4.1-mini", cache_dir="runs/judge_cache")  # $OPENAI_API_KEY
judge = make_judge("Qwen/Qwen2.5-7B-Instruct", base_url="http://127.0.0.1:8000/v1")  # vLLM & co.
judge = make_judge("local")  # the embedded SmolLM2, in process, offline
scores = judge.score(prompts)  # [JudgeScore(score, method, error)], same order
"""

from persona.constants import MIN_MASS
from persona.judges.aggregation import AGGREGATIONS, aggregate
from persona.judges.base import (
    DIGIT_CHAIN,
    FAILED,
    LOGPROBS,
    METHODS,
    PARSED,
    REFUSAL,
    Judge,
    JudgeScore,
)
from persona.judges.cache import JudgeCache
from persona.judges.local_judge import LocalJudge
from persona.judges.openai_judge import OpenAIJudge

DEFAULT_LOCAL_MODEL = "smollm2-135m"


def judge_name(spec: str = "local", *, min_mass: float | None = None) -> str:
    """The name a judge built from ``spec`` records beside its scores (without building it)."""
    if spec == "local" or spec.startswith("local:"):
        name = f"local:{spec.partition(':')[2] or DEFAULT_LOCAL_MODEL}"
        return name if min_mass is None or min_mass == MIN_MASS else f"{name}@min_mass={min_mass:g}"
    return f"openai:{spec.removeprefix('openai:')}"


def make_judge(
    spec: str = "local",
    *,
    base_url: str | None = None,
    aggregation: str = "0_100",
    cache_dir: str | None = None,
    **kwargs,
) -> Judge:
    """Build a judge from a spec string.

    Args:
        spec: ``local`` (the embedded SmolLM2), ``local:<model alias|hub id|path>``, ``openai:<model>``, or any
            other string, taken as a model name on an OpenAI-compatible server.
        base_url: OpenAI-compatible server root (e.g. ``http://127.0.0.1:8000/v1``); default ``$OPENAI_BASE_URL``.
        aggregation: ``0_100`` (the seed's), ``0_10`` or ``binary``; all answer on 0-100.
        cache_dir: directory of the score cache; None disables caching.
        kwargs: passed on to ``LocalJudge`` or ``OpenAIJudge`` (``batch_size``, ``max_concurrency``, ``timeout``, ...).
    """
    if spec == "local" or spec.startswith("local:"):
        if base_url is not None:
            raise ValueError(
                f"make_judge({spec!r}, base_url={base_url!r}): a local judge runs in process and takes no base_url. "
                "Fix: drop base_url, or name the served model instead, e.g. make_judge('openai:<model>', base_url=...)."
            )
        model = spec.partition(":")[2] or DEFAULT_LOCAL_MODEL
        kwargs.setdefault("name", judge_name(spec, min_mass=kwargs.get("min_mass")))
        return LocalJudge(model, aggregation=aggregation, cache_dir=cache_dir, **kwargs)
    model = spec.removeprefix("openai:")
    if not model:
        raise ValueError(f"make_judge({spec!r}): no model name. Fix: e.g. 'openai:gpt-4.1-mini'.")
    return OpenAIJudge(model, base_url=base_url, aggregation=aggregation, cache_dir=cache_dir, **kwargs)


__all__ = [
    "AGGREGATIONS",
    "DIGIT_CHAIN",
    "FAILED",
    "LOGPROBS",
    "METHODS",
    "PARSED",
    "REFUSAL",
    "Judge",
    "JudgeCache",
    "JudgeScore",
    "LocalJudge",
    "OpenAIJudge",
    "aggregate",
    "judge_name",
    "make_judge",
]
