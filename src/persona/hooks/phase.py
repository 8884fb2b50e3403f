"""Prefill or cached decode step: decided from what a forward carries, not from what its arguments are called.

transformers has renamed the decoder stack's cache argument before (``past_key_values`` became ``cache``
in 5.24), and a tracker that read one keyword took every decode step for a prefill pass. Here the cache
is found by its type among *all* arguments, and the 2D attention mask (past + current columns) must tell
the same story: a disagreement is an error, never a guess.

Nothing here reads a value off the device while ``torch.compile`` traces a forward (transformers compiles the
decode steps of a static-cache ``generate``): a read would split the graph (or, with ``fullgraph``, sync the
host every step). See :func:`cached_tokens` for what is known without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


class PhaseError(RuntimeError):
    """The forward's arguments do not say whether it is a prefill pass or a cached decode step."""


@dataclass(frozen=True)
class PackedForward:
    """A forward that packs several requests into one sequence (transformers' continuous batching).

    ``hidden`` is ``[1, total_tokens, width]``; request ``i`` owns tokens ``cu_seq_lens_q[i]:cu_seq_lens_q[i+1]``
    at the absolute positions ``position_ids[0, ...]``. Some requests are in prefill, some decode, some run one
    chunk of a long prompt: there is no single phase, so only a caller that knows the scheduler's state (the
    engine, :mod:`persona.generation.engine`) can tell which token is whose.
    """

    cu_seq_lens_q: Any  # int tensor [requests + 1]
    position_ids: Any  # int tensor [1, total_tokens]


PACKED_REFUSAL = (
    "This forward packs several requests into one sequence (transformers continuous batching: it carries "
    "cu_seq_lens_q and a paged KV cache), so prefill and decode tokens of different requests mix and "
    "steer()/steer_rows() cannot tell them apart. Fix: run per-request interventions through "
    "persona.generation.engine.Engine, or generate with model.generate."
)


def find_packed(kwargs: Mapping[str, Any]) -> PackedForward | None:
    """The packing of a continuous-batching forward (by its ``cu_seq_lens_q`` and ``position_ids``), or None.

    A paged cache without ``cu_seq_lens_q`` is a packed forward whose layout is unknown: an error, not a guess.
    """
    if torch.compiler.is_compiling():  # the engine never compiles; a compiled static-cache step is not packed
        return None
    cu = kwargs.get("cu_seq_lens_q")
    paged = type(kwargs.get("cache", kwargs.get("past_key_values"))).__name__ == "PagedAttentionCache"
    if cu is None and not paged:
        return None
    positions = kwargs.get("position_ids")
    if not isinstance(cu, torch.Tensor) or not isinstance(positions, torch.Tensor):
        raise PhaseError(
            "A continuous-batching forward (paged KV cache) came without cu_seq_lens_q and position_ids tensors, "
            "so no token can be mapped to its request. Fix: pin transformers to the version in the project's "
            "lock (requirements/lock.txt) and report this."
        )
    return PackedForward(cu, positions)


def _cache_base_class() -> type | None:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers without cache classes
        return None
    return Cache


def _is_legacy_cache(value: Any) -> bool:
    """The tuple-of-(key, value)-per-layer caches of older transformers releases."""
    if not isinstance(value, (tuple, list)) or not value:
        return False
    first = value[0]
    return (
        isinstance(first, (tuple, list))
        and len(first) >= 2
        and isinstance(first[0], torch.Tensor)
        and first[0].dim() == 4
    )


def _values(args: Iterable[Any], kwargs: Mapping[str, Any]) -> Iterator[Any]:
    yield from args
    for value in kwargs.values():
        if isinstance(value, Mapping):  # **kwargs forwarded as one dict by some wrappers
            yield from value.values()
        else:
            yield value


def find_cache(args: Iterable[Any], kwargs: Mapping[str, Any]) -> Any | None:
    """The KV cache among a forward's arguments, by type: a transformers ``Cache`` or a legacy tuple cache."""
    cache_class = _cache_base_class()
    for value in _values(args, kwargs):
        if cache_class is not None and isinstance(value, cache_class):
            return value
        if callable(getattr(value, "get_seq_length", None)) and not isinstance(value, torch.Tensor):
            return value
        if _is_legacy_cache(value):
            return value
    return None


def cached_tokens(cache: Any | None) -> int | bool | None:
    """How much ``cache`` holds, as far as it is known without a device read: None (no cache), a count, or True.

    Dynamic and legacy caches know their length on the host. A static cache keeps its counter in a device
    tensor: a cache none of whose layers was ever written holds nothing (no read needed); otherwise, outside
    ``torch.compile``, the counter is read. Inside a compiled forward it is not read: transformers compiles only
    the decode steps of ``generate``, after an eager prefill wrote the cache, so a written static cache there
    holds tokens (True, count unknown). A test pins that transformers behaviour; chunked prefill, which compiles
    prompt chunks too, is refused by the fast generation path for this reason.
    """
    if cache is None:
        return None
    if _is_legacy_cache(cache):
        return int(cache[0][0].shape[-2])
    layers = getattr(cache, "layers", None)
    if (
        isinstance(layers, (list, tuple))
        and layers
        and not any(getattr(layer, "is_initialized", True) for layer in layers)
    ):
        return 0
    length = cache.get_seq_length()
    if not isinstance(length, torch.Tensor):
        return int(length)
    if torch.compiler.is_compiling():
        return True
    return int(length)


def decide_prefill(
    *, cache_tokens: int | bool | None, mask: Any | None, seq_len: int, model_name: str
) -> bool | str:
    """True for a prefill pass, False for a cached decode step, or an error message when the signals disagree.

    ``cache_tokens`` (from :func:`cached_tokens`) is None when no cache was found among the arguments, True when
    the cache holds an unread number of tokens. A 2D ``mask`` covers the past and the current positions, so
    ``mask columns - seq_len`` is the number of earlier tokens; other masks (4D, dicts) say nothing about it.
    """
    cache_says_past = None if cache_tokens is None else cache_tokens > 0
    is_2d = isinstance(mask, torch.Tensor) and mask.dim() == 2
    mask_past = mask.shape[-1] - seq_len if is_2d else None
    mask_says_past = None if mask_past is None else mask_past > 0
    if cache_says_past is None and mask_says_past is None:
        return True  # no cache and no padding mask: a plain forward over the whole sequence
    if cache_says_past is not None and mask_says_past is not None and cache_says_past != mask_says_past:
        return _disagreement(model_name, cache_tokens, mask_past)
    if cache_says_past is None and mask_says_past:
        return _disagreement(model_name, None, mask_past)
    return not (cache_says_past if cache_says_past is not None else mask_says_past)


def _disagreement(model_name: str, cache_tokens: int | None, mask_past: int | None) -> str:
    import transformers

    if cache_tokens is None:
        cache = "no KV cache was found among its arguments"
    elif cache_tokens is True:
        cache = "the KV cache among its arguments holds tokens"
    else:
        cache = f"the KV cache among its arguments holds {cache_tokens} tokens"
    return (
        f"Cannot tell a prefill pass from a cached decode step in {model_name} (transformers "
        f"{transformers.__version__}): {cache}, but the attention mask implies {mask_past} earlier tokens. "
        "Steering by prompt/response position needs the phase. Fix: use positions='all', or pin "
        "transformers to the version in the project's lock (requirements/lock.txt) and report this."
    )
