"""Judges: one filled judge prompt -> one 0-100 score, from an OpenAI-compatible server or a local model.

judge = make_judge("openai:gpt-4.1-mini", cache_dir="runs/judge_cache")  # $OPENAI_API_KEY
judge = make_judge("Qwen/Qwen2.5-7B-Instruct", base_url="http://127.0.0.1:8000/v1")  # vLLM & co.
judge = make_judge("local")  # the embedded SmolLM2, in process, offline
scores = judge.score(prompts)  # [JudgeScore(score, method, error)], same order

May import: ``core``, ``models``, ``data`` (chat rendering). A judge knows nothing of vectors or steering.
"""

from typing import TYPE_CHECKING

from persona.core.errors import PersonaError
from persona.judges.aggregation import AGGREGATIONS, aggregate
from persona.judges.base import (
    DEFAULT_LOCAL_MODEL,
    DIGIT_CHAIN,
    FAILED,
    LOGPROBS,
    METHODS,
    PARSED,
    REFUSAL,
    Judge,
    JudgeScore,
    judge_name,
)
from persona.judges.cache import JudgeCache

if TYPE_CHECKING:
    from persona.judges.local_judge import LocalJudge
    from persona.judges.openai_judge import OpenAIJudge


def __getattr__(name: str):
    # The judges import torch (local) and openai (served) on first use, so the config checks that import
    # this package stay fast and torch-free.
    if name == "LocalJudge":
        from persona.judges.local_judge import LocalJudge

        return LocalJudge
    if name == "OpenAIJudge":
        from persona.judges.openai_judge import OpenAIJudge

        return OpenAIJudge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_min_mass(
    judge_model: str,
    min_mass: float | None,
    *,
    flag: str = "--judge_min_mass",
    local: str = "--judge_model local",
) -> None:
    """Refuse a min_mass for a served judge: only local judges read probabilities that way.

    ``flag`` and ``local`` name the setting and the local choice as the caller's user writes them.
    """
    if min_mass is not None and not judge_model.startswith("local"):
        raise PersonaError(f"{flag} applies to local judges only. Fix: drop it or use {local}.")


def check_served_judge(
    judge_model: str,
    base_url: str | None,
    *,
    model_field: str = "--judge_model",
    url_field: str = "--judge_base_url",
    timeout: float = 5.0,
) -> None:
    """A served judge can be reached, asked once before any model loads: a server that isn't there is named
    now, in the caller's own field names, not after minutes of generation and six retries per answer."""
    import os

    if judge_model.startswith("local"):
        return
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    if base_url is None:
        if not os.environ.get("OPENAI_API_KEY"):
            raise PersonaError(
                f"{model_field}={judge_model!r} is served by OpenAI's API, which needs OPENAI_API_KEY. Fix: export "
                f"OPENAI_API_KEY=..., set {url_field} to your own server, or use {model_field} local."
            )
        return  # OpenAI's own API: a key is all that can be checked without spending a call
    import openai

    client = openai.OpenAI(
        base_url=base_url,
        api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",
        timeout=timeout,
        max_retries=0,
    )
    try:
        client.models.list()
    except openai.APIStatusError:
        return  # it answered (some servers have no /models): reachable
    except openai.APIConnectionError as error:
        cause = error.__cause__ or error
        raise PersonaError(
            f"{url_field}={base_url}: no judge answers there ({type(cause).__name__}: {cause}). Fix: start the "
            f"judge's server (vLLM, llama.cpp server, Ollama) or correct {url_field}."
        ) from None


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
        from persona.judges.local_judge import LocalJudge

        model = spec.partition(":")[2] or DEFAULT_LOCAL_MODEL
        kwargs.setdefault("name", judge_name(spec, min_mass=kwargs.get("min_mass")))
        return LocalJudge(model, aggregation=aggregation, cache_dir=cache_dir, **kwargs)
    from persona.judges.openai_judge import OpenAIJudge

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
    "check_min_mass",
    "judge_name",
    "make_judge",
]
