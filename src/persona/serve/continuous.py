"""`persona serve` on the continuous-batching engine: a request joins the running batch at the next step.

One scheduler thread owns the :class:`persona.generation.engine.Engine`. Each turn it submits the jobs that
arrived (the engine packs them into the next forward: decoding rows, prompt chunks of at most
``max_batch_tokens``), reads every request's tokens so far, and runs them through the same
:class:`~persona.serve.tracker.RowState` as the static path (streamed deltas, stop sequences, ``max_tokens``, the
monitored read-back token). A request whose client left, or whose reply a stop sequence ended, is cancelled at
once: the engine drops it from the next forward and frees its cache pages. The final :class:`Finished` carries
the projections read from the engine's per-position read-outs and each gated entry's decision.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from persona.generation.engine import Engine, EngineConfig, EngineRequest, EngineResult
from persona.serve.batcher import QueueFull
from persona.serve.engine import GenerationJob, eos_token_ids
from persona.serve.metrics import ServerMetrics
from persona.serve.monitoring import reply_projections
from persona.serve.tracker import Failed, Finished, RowState


@dataclass
class _Row:
    job: GenerationJob
    state: RowState
    columns: dict[tuple[str, int], int]  # (trait, layer) -> column of the engine's read-outs at that layer
    seen: int = 0  # tokens handed to ``state`` so far
    last_token_at: float | None = None


class ContinuousBatcher:
    """The static ``DynamicBatcher``'s interface (``start``, ``submit``, ``close``, ``run_batch``) on the engine.

    ``max_batch`` requests run at once (the engine's ``max_requests_per_batch``); ``max_queue`` more may wait
    for a place or for cache pages, beyond that ``submit`` raises :class:`QueueFull` (HTTP 429).
    """

    observes_tokens = True  # time to first token and inter-token latency come from here, for every reply

    def __init__(
        self,
        model,
        tokenizer,
        config: EngineConfig,
        *,
        max_queue: int,
        metrics: ServerMetrics | None = None,
    ):
        self.engine = Engine(
            model, config, on_forward=None if metrics is None else metrics.batch_size.observe
        )
        self.tokenizer, self.eos_ids = tokenizer, eos_token_ids(model, tokenizer)
        self.capacity = config.max_requests_per_batch + max_queue
        self.metrics = metrics
        self._inbox: deque[GenerationJob] = deque()
        self._rows: dict[str, _Row] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the batcher interface
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="persona-engine", daemon=True)
        self._thread.start()
        if self.metrics is not None:
            self.metrics.queue_depth.set_function(lambda: len(self._inbox) + self.engine.load()[0])
            self.metrics.cache_usage.set_function(lambda: self.engine.load()[1])

    def submit(self, job: GenerationJob) -> None:
        if len(self._inbox) + len(self._rows) >= self.capacity:
            raise QueueFull
        self._inbox.append(job)
        self._wake.set()
        self.engine.wake()  # the scheduler thread may be waiting for the engine's next output: admit now

    async def close(self) -> None:
        """Finish what was submitted, then stop the scheduler thread and the engine."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.engine.close()

    def run_batch(self, jobs: Sequence[GenerationJob]) -> None:
        """Serve ``jobs`` to the end on the calling thread (the start-up baseline, before :meth:`start`)."""
        self._inbox.extend(jobs)
        while self._inbox or self._rows:
            self._turn()

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        while not (self._stopping and not self._inbox and not self._rows):
            if not self._inbox and not self._rows:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            self._turn()

    def _turn(self) -> None:
        self._admit()
        if not self._rows:
            return
        # Waits for the next step's outputs (streamed every step) or a submit's wake-up, not a fixed tick.
        finished = {request_id: self.engine.result(request_id) for request_id in self.engine.poll(0.1)}
        now = time.monotonic()
        for request_id, row in list(self._rows.items()):
            self._advance(request_id, row, finished.get(request_id), now)

    def _admit(self) -> None:
        while self._inbox:
            job = self._inbox.popleft()
            if job.cancelled:
                continue
            request, columns = engine_request(job, sorted(self.eos_ids))
            try:
                request_id = self.engine.submit(request)
            except (ValueError, RuntimeError) as error:  # e.g. larger than the whole cache: this job only
                job.emit(Failed(f"generation failed: {error}"))
                continue
            self._rows[request_id] = _Row(
                job, RowState(job, self.tokenizer, frozenset(self.eos_ids)), columns
            )

    def _advance(self, request_id: str, row: _Row, result: EngineResult | None, now: float) -> None:
        if row.job.cancelled:  # the client left: out of the next forward, its pages freed
            self._drop(request_id, result)
            return
        if result is not None and result.status != "finished":
            del self._rows[request_id]
            row.job.emit(Failed(f"generation failed: {result.error or result.status}"))
            return
        tokens = result.tokens if result is not None else self.engine.partial(request_id)
        before, complete = row.seen, False
        for token in tokens[before:]:
            row.seen += 1
            if row.state.step(token):
                complete = True
                break
            if row.job.cancelled:  # the client left while this turn's tokens were handed over
                break
        self._observe(row, row.seen - before, now)
        if row.job.cancelled:
            self._drop(request_id, result)
        elif complete or result is not None:
            del self._rows[request_id]
            if result is None:  # a stop sequence (or the read-back token) ended it before the engine did
                self.engine.cancel(request_id)
                result = self.engine.result(request_id)
            self._finish(row, result)

    def _drop(self, request_id: str, result: EngineResult | None) -> None:
        del self._rows[request_id]
        if result is None:
            self.engine.cancel(request_id)
            self.engine.result(request_id)

    def _observe(self, row: _Row, count: int, now: float) -> None:
        if self.metrics is None or count <= 0:
            return
        if row.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - row.job.enqueued_at)
            count -= 1
        else:
            for _ in range(count):  # tokens that arrived together share the interval
                self.metrics.inter_token_latency.observe((now - row.last_token_at) / count)
        row.last_token_at = now

    def _finish(self, row: _Row, result: EngineResult) -> None:
        state, job = row.state, row.job
        state.done = True
        try:
            projections = [
                (target, reply_projections(result.readings, row.columns, target, len(job.prompt_ids), len(state.tokens)))
                for target in job.monitor
            ]  # fmt: skip
        except ValueError as error:
            job.emit(Failed(f"monitoring failed: {error}"))
            return
        job.emit(
            Finished(
                text=state.text,
                finish_reason=state.finish_reason or "length",
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(state.tokens) + int(state.ended_by_eos),
                projections=projections,
                token_ids=list(state.tokens),
                fired=dict(result.fired),
            )
        )


def engine_request(job: GenerationJob, eos_ids: Sequence[int]) -> tuple[EngineRequest, dict]:
    """The job as an :class:`EngineRequest` (a monitored reply runs one more step to read its last token), and
    where each monitored (trait, layer) lands in the read-outs."""
    monitor: dict[int, list[torch.Tensor]] = {}
    columns: dict[tuple[str, int], int] = {}
    for target in job.monitor:
        key = (target.trait, target.layer)
        if key not in columns:
            found = monitor.setdefault(target.layer, [])
            columns[key] = len(found)
            direction = target.direction.detach().float()
            found.append(direction / direction.norm().clamp_min(1e-12))  # projections on the unit direction
    request = EngineRequest(
        job.prompt_ids,
        job.max_tokens + int(bool(job.monitor)),
        job.interventions,
        monitor={layer: torch.stack(found) for layer, found in monitor.items()},
        temperature=job.sampling.temperature,
        top_p=job.sampling.top_p,
        seed=job.sampling.seed,
        stop_token_ids=eos_ids,
        min_new_tokens=job.sampling.min_tokens,
        stream=True,
    )
    return request, columns
