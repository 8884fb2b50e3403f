"""Following every row of a batch while ``generate`` runs: its text, its stop condition, its stream.

:class:`BatchTracker` is the batch's stopping criterion. ``generate`` calls it after each step with all
ids so far, and its answer decides which rows ``generate`` pads from then on, so "which tokens belong to
which reply" is decided in this one place. A row finishes on an end-of-sequence token (not part of
the reply), a stop sequence (cut from the text, as OpenAI does) or ``max_tokens``; a monitored row cut
by the last two then reads back one more step (see :mod:`persona.serve.monitoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import StoppingCriteria

from persona.data.chat import answer_text
from persona.serve.monitoring import ProjectionRecorder
from persona.serve.traits import MonitorTarget


@dataclass
class TextDelta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    projections: list[tuple[MonitorTarget, tuple[float, float | None]]] = field(default_factory=list)
    token_ids: list[int] = field(
        default_factory=list
    )  # the reply's tokens (no end-of-sequence token); for logs
    fired: dict[int, bool] = field(
        default_factory=dict
    )  # index in the job's interventions.specs -> its gate fired


@dataclass
class Failed:
    message: str


Event = TextDelta | Finished | Failed


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop sequence starts in ``text``, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def streamable_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of an unfinished reply that is safe to send: no half of a stop sequence, no half character."""
    keep = len(text)
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                keep = min(keep, len(text) - length)
                break
    text = text[:keep]
    return text.rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives


class RowState:
    """One reply in the batch."""

    def __init__(self, job, tokenizer, eos_ids: frozenset[int]):
        self.job, self.tokenizer, self.eos_ids = job, tokenizer, eos_ids
        self.tokens: list[int] = []
        self.text, self.sent = "", ""
        self.finish_reason: str | None = None
        self.ended_by_eos = False
        self.reading_back = False
        self.done = False
        # Decoding the whole reply at every token costs O(length) per step; only streams and stop sequences need it.
        self.watch_text = bool(job.stream or job.stop)

    def step(self, token: int) -> bool:
        """Take this row's newest token; True when the reply is complete (finish it)."""
        if self.reading_back:
            return True
        if token in self.eos_ids:
            self.finish_reason, self.ended_by_eos = "stop", True
        else:
            self.tokens.append(token)
            if self.watch_text:
                self._read_text()
            if self.finish_reason is None and len(self.tokens) >= self.job.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason is None:
                self._send(streamable_prefix(self.text, self.job.stop))
                return False
        if not self.watch_text:  # nothing streamed and no stop sequence: one decode, at the end
            self.text = answer_text(self.tokenizer, self.tokens)
        self._send(self.text)  # with EOS: what was held back in case a stop sequence followed
        if self.job.monitor and not self.ended_by_eos:
            self.reading_back = True  # one more forward reads the last token; its output is dropped
            return False
        return True

    def _read_text(self) -> None:
        """The reply so far, cut at a stop sequence (which finishes it)."""
        text = answer_text(self.tokenizer, self.tokens)
        cut = find_stop(text, self.job.stop)
        if cut is not None:
            text, self.finish_reason = text[:cut], "stop"
        self.text = text

    def _send(self, visible: str) -> None:
        if self.job.stream and len(visible) > len(self.sent) and visible.startswith(self.sent):
            self.job.emit(TextDelta(visible[len(self.sent) :]))
            self.sent = visible


class BatchTracker(StoppingCriteria):
    def __init__(self, jobs: Sequence, tokenizer, eos_ids, recorder: ProjectionRecorder, gates=None):
        eos = frozenset(eos_ids)
        self.rows = [RowState(job, tokenizer, eos) for job in jobs]
        self.recorder = recorder
        self.gates = gates  # persona.steering.rows.RowGates: each row's gate decisions (made at prefill)

    def row_done(self, index: int) -> bool:
        return self.rows[index].done

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        newest = input_ids[:, -1].tolist()
        for index, (row, token) in enumerate(zip(self.rows, newest, strict=True)):
            if row.done:
                continue
            if row.job.cancelled:
                row.done = True  # the client left: nothing more to send
            elif row.step(token):
                self.finish(index)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def finish(self, index: int, reason: str | None = None) -> None:
        """Send the row's final event (its projections need the records up to now)."""
        row = self.rows[index]
        row.done = True
        row.finish_reason = row.finish_reason or reason or "length"
        projections = [
            (target, self.recorder.row_projections(index, target, len(row.tokens)))
            for target in row.job.monitor
        ]
        row.job.emit(
            Finished(
                text=row.text,
                finish_reason=row.finish_reason,
                prompt_tokens=len(row.job.prompt_ids),
                completion_tokens=len(row.tokens) + int(row.ended_by_eos),
                projections=projections,
                token_ids=list(row.tokens),
                fired={} if self.gates is None else self.gates.fired(index),
            )
        )

    def finish_all(self, reason: str) -> None:
        """Rows ``generate`` stopped without our say (it reached its own length limit)."""
        for index, row in enumerate(self.rows):
            if not row.done and not row.job.cancelled:
                self.finish(index, reason)
