"""What a caller submits to the :class:`~persona.generation.engine.Engine` and what it gets back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from persona.steering import RowInterventions


@dataclass
class EngineConfig:
    """The cache and the step budget: what bounds the engine's memory (set them; nothing is sized from free RAM).

    The KV cache holds ``num_blocks * page_size`` tokens per layer, shared by every request in flight; a request
    whose prompt plus ``max_new_tokens`` cannot fit in an empty cache is refused when submitted, and requests
    that do not fit now wait in the queue. ``max_batch_tokens`` caps the tokens of one forward (a longer prompt
    is prefilled in chunks of at most that many, alongside the decoding requests).
    """

    num_blocks: int = 64
    page_size: int = 32
    max_batch_tokens: int = 256
    max_requests_per_batch: int = 16
    max_queue_size: int = 1024
    check_forward: bool = True
    """Cross-check every forward's ``cu_seq_lens_q``/``position_ids`` against the scheduler (a host read)."""

    def __post_init__(self) -> None:
        for name in (
            "num_blocks",
            "page_size",
            "max_batch_tokens",
            "max_requests_per_batch",
            "max_queue_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r}. Fix: pass a positive integer.")


@dataclass
class EngineRequest:
    """One prompt (token ids) and everything that applies to it alone."""

    prompt: Sequence[int]
    max_new_tokens: int
    interventions: RowInterventions = field(default_factory=RowInterventions)
    """Steering, caps and ablations (``specs``, in order at each layer, after the ``ablations`` mapping there),
    with the positions modes of :class:`persona.steering.SteeringSpec`, each optionally gated (``when``: decided
    from the last prompt token, see :mod:`.steps`)."""
    monitor: Mapping[int, Tensor] = field(default_factory=dict)
    """Layer -> unit directions ``[n, hidden]``: the projection of every token at that layer (after this
    request's interventions there) is returned in :attr:`EngineResult.readings`."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    min_new_tokens: int = 0
    """The stop tokens cannot be drawn before this many new tokens (vLLM's ``min_tokens``)."""
    stream: bool = False
    """Make the tokens so far readable after every step (:meth:`Engine.partial`), not only at the end."""


@dataclass
class EngineResult:
    """``status``: ``finished`` (a stop token or ``max_new_tokens``), ``cancelled`` or ``failed`` (see ``error``)."""

    request_id: str
    tokens: list[int]
    status: str
    error: str | None = None
    readings: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> ``[positions, n]``: positions 0.. of prompt + reply (the last reply token is never run)."""
    fired: dict[int, bool] = field(default_factory=dict)
    """Index in ``interventions.specs`` -> whether that gated entry fired (absent: not decided, or a no-op)."""
