"""Which token of a packed forward is whose, and in which phase: read from the scheduler, checked against the forward.

A continuous-batching forward carries ``[1, total_tokens, width]``: one segment per scheduled request, in the
order of ``cu_seq_lens_q``. The request ids are not in the forward; they are in the scheduler's state for the
batch in flight (:func:`scheduled_segments`, the one place that reads transformers' scheduler internals). Each
segment's start position and length come from that state and must equal what the forward carries
(:func:`check_segments`); any disagreement is a :class:`PlanError` and no token is steered.

The phase of a token follows from its absolute position ``p`` and its request's prompt length ``P``:
``prompt`` is ``p < P``, ``generated`` is ``p >= P``, ``response`` is ``p >= P - 1`` (the last prompt token, then
every generated one), ``all`` is every token -- the modes of :class:`persona.steering.SteeringSpec`, for any
chunking of the prompt and for a request re-prefilled after the scheduler evicted it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from persona.hooks.phase import PackedForward


class PlanError(RuntimeError):
    """The scheduler's state and the forward disagree about which token belongs to which request."""


@dataclass(frozen=True)
class Segment:
    """One request's tokens in a packed forward: rows ``start:end``, absolute positions ``first`` onwards."""

    request_id: str
    start: int
    end: int
    first: int
    prompt_len: int

    @property
    def positions(self) -> Tensor:
        return torch.arange(self.first, self.first + self.end - self.start)

    def where(self, mode: str) -> Tensor:
        """bool [end - start]: the tokens of this segment that ``mode`` steers."""
        p = self.positions
        if mode == "all":
            return torch.ones_like(p, dtype=torch.bool)
        if mode == "prompt":
            return p < self.prompt_len
        if mode == "generated":
            return p >= self.prompt_len
        if mode == "response":
            return p >= self.prompt_len - 1
        raise ValueError(
            f"positions={mode!r} is not a steering mode. Fix: use response, generated, prompt or all."
        )


def scheduled_segments(batch) -> list[Segment]:
    """Segments from ``ContinuousBatchingIOs.requests_in_batch`` (``FutureRequestState``s, in forward order).

    Read at hook time: ``state.position_offset`` was already advanced by ``query_length``, so the chunk starts at
    ``position_offset - query_length``. ``_true_initial_tokens`` is the prompt length of a request re-prefilled
    (prompt + generated tokens) after a soft reset; 0 otherwise. ``has_new_token`` must say whether the chunk
    ends the prefill, as the positions do.
    """
    segments, start = [], 0
    for future in batch:
        state, length = future.state, future.query_length
        first = state.position_offset - length
        prefill_end = len(state.initial_tokens)
        if bool(future.has_new_token) != (first + length >= prefill_end):
            raise PlanError(
                f"request {state.request_id}: has_new_token={future.has_new_token} but its chunk ends at "
                f"position {first + length} of a {prefill_end}-token prefill"
            )
        prompt_len = state._true_initial_tokens or prefill_end
        segments.append(Segment(state.request_id, start, start + length, first, prompt_len))
        start += length
    return segments


def check_segments(segments: list[Segment], packed: PackedForward, total: int) -> None:
    """Raise :class:`PlanError` unless the forward's ``cu_seq_lens_q`` and ``position_ids`` tell the same story."""
    expected = [0] + [segment.end for segment in segments]
    cu = packed.cu_seq_lens_q.tolist()
    if cu != expected or expected[-1] != total:
        raise PlanError(
            f"the forward's cu_seq_lens_q is {cu} over {total} tokens, the scheduler's segments end at {expected}"
        )
    positions = packed.position_ids.reshape(-1).to("cpu", torch.long)
    for segment in segments:
        got = positions[segment.start : segment.end]
        if not torch.equal(got, segment.positions):
            raise PlanError(
                f"request {segment.request_id}: the forward's position_ids are {got.tolist()}, the scheduler's "
                f"{segment.positions.tolist()}"
            )
