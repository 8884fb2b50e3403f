"""Whole replies on the continuous-batching engine for the generation loop: which path runs, its cache, the stream.

``persona generate`` runs its answers on :class:`persona.generation.engine.Engine` where the engine can run them
exactly; :func:`engine_blocker` names what keeps the static path (:func:`persona.steering.generate_steered`):
a transformers older than the engine's floor, an architecture it refuses, a gated intervention, a PEFT adapter
(not yet checked on the engine), or a generation config whose logits settings the engine does not apply.

Greedy answers equal the static path's token for token. A sampled answer draws from its own generator, seeded
from the run's seed and the answer's key, so it depends on neither its batch mates nor batching, ranks or a resume
(the static path draws a whole batch from the global stream: the same distribution, other draws).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

from persona.generation.engine import Engine, EngineConfig, EngineRequest, EngineResult

# GenerationConfig fields that change tokens through logits processors the engine does not run (greedy or not).
LOGITS_SETTINGS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "min_length",
    "min_new_tokens",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
)


def engine_blocker(model, specs: Sequence) -> str | None:
    """Why the engine cannot run this model and these interventions exactly (None: it can)."""
    from transformers import GenerationConfig

    from persona.generation.engine.core import UNSUPPORTED, check_transformers

    try:
        check_transformers()
    except RuntimeError as error:
        return str(error).split(". Fix")[0]
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in UNSUPPORTED:
        return f"the engine cannot run {model_type}: {UNSUPPORTED[model_type]}"
    if hasattr(model, "peft_config"):
        return "a PEFT adapter model (not yet checked on the engine)"
    if any(getattr(spec, "when", None) is not None for spec in specs):
        return "a gated intervention (--when_above/--when_below), which the engine does not support yet"
    config, default = getattr(model, "generation_config", None), GenerationConfig()
    changed = [
        name for name in LOGITS_SETTINGS if getattr(config, name, None) != getattr(default, name, None)
    ]
    if config is not None and changed:
        return f"the model's generation_config sets {', '.join(changed)}, which the engine does not apply"
    return None


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end a reply: the model's generation config's EOS (what ``generate`` stops on), else the
    tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [int(token) for token in ([eos] if isinstance(eos, int) else eos)]


def engine_config(rows: int, longest_prompt: int, max_new_tokens: int, page_size: int = 32) -> EngineConfig:
    """A cache that holds ``rows`` requests of the longest prompt + ``max_new_tokens`` each (the memory the static
    path's batch of ``rows`` takes), ``rows`` requests per step."""
    pages = math.ceil((longest_prompt + max_new_tokens) / page_size)
    return EngineConfig(
        num_blocks=rows * pages,
        page_size=page_size,
        max_batch_tokens=max(256, 32 * rows),
        max_requests_per_batch=rows,
    )


def stream_results(
    engine: Engine, requests: Sequence[EngineRequest], window: int, check: Callable[[], None] = lambda: None
) -> Iterator[tuple[int, EngineResult]]:
    """``(index, result)`` for every request in the order they finish; at most ``window`` are submitted and
    unfinished at a time (the rest wait here, not in the engine's queue). ``check`` runs between polls (it may
    raise, e.g. on SIGTERM). A failed request raises: its answer cannot be produced."""
    submitted, in_flight = 0, {}
    while submitted < len(requests) or in_flight:
        while submitted < len(requests) and len(in_flight) < window:
            in_flight[engine.submit(requests[submitted])] = submitted
            submitted += 1
        check()
        for request_id in engine.poll(0.05):
            result = engine.result(request_id)
            if result.status != "finished":
                raise RuntimeError(
                    f"the engine could not finish an answer ({result.status}): {result.error}. Fix: re-run the same "
                    "command to resume (finished answers are kept), or pass --engine false for the static path."
                )
            yield in_flight.pop(request_id), result
