"""The dynamic batcher: a bounded queue in front of one model thread.

A batch starts with the first waiting job and takes whatever else arrives within ``max_wait_s``, up to
``max_batch`` jobs, whatever their persona settings; jobs that arrive while it runs wait for the next
one. A full queue refuses new jobs at once (HTTP 429) instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from persona.serve.engine import GenerationJob
from persona.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class DynamicBatcher:
    observes_tokens = False  # the app observes time to first token of streams itself

    def __init__(
        self,
        run_batch: Callable[[Sequence[GenerationJob]], None],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: ServerMetrics | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"max_batch={max_batch}, max_queue={max_queue}, max_wait_s={max_wait_s}: "
                "Fix: max_batch and max_queue >= 1, max_wait >= 0."
            )
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.metrics = metrics
        self._queue: asyncio.Queue[GenerationJob] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persona-model")
        self._task = asyncio.create_task(self._loop(), name="persona-batcher")
        if self.metrics is not None:
            self.metrics.queue_depth.set_function(lambda: self._queue.qsize() if self._queue else 0)

    def submit(self, job: GenerationJob) -> None:
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.submit before start()")
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None

    async def close(self) -> None:
        """Finish the queue and the batch in flight, then stop the model thread."""
        if self._task is None:
            return
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._executor.shutdown(wait=True)
        self._task = None

    async def _next_batch(self) -> list[GenerationJob]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [job for job in batch if not job.cancelled]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.monotonic()
            if self.metrics is not None:
                self.metrics.observe_batch_start(batch, started)
            try:
                # Shielded: a shutdown waits for the batch in flight instead of abandoning its requests.
                await asyncio.shield(loop.run_in_executor(self._executor, self.run_batch, batch))
            except Exception:  # run_batch reports its own failures to its jobs; this is a last resort
                log.exception("the model thread raised")
            if self.metrics is not None:
                self.metrics.batch_seconds.observe(time.monotonic() - started)
