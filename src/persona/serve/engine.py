"""One batch of replies in one ``generate`` call: per-row persona interventions, monitoring, sampling, stopping.

:meth:`Engine.run_batch` is blocking and runs on the batcher's single model thread; each job learns
about its reply through ``job.emit`` (text deltas when streaming, then one :class:`Finished` or
:class:`Failed`), called from that thread as soon as its row is done, not when the batch is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from persona.core.hardware import input_device
from persona.data.batches import left_pad
from persona.hooks import block_hooks
from persona.serve.monitoring import ProjectionRecorder
from persona.serve.sampling import RowSampler, SamplingParams
from persona.serve.tracker import BatchTracker, Event, Failed
from persona.serve.traits import MonitorTarget
from persona.steering.rows import RowGates, RowInterventions, steer_rows

log = logging.getLogger(__name__)


@dataclass(eq=False)
class GenerationJob:
    """One reply to produce, with everything already validated and resolved."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    interventions: RowInterventions = field(default_factory=RowInterventions)
    monitor: tuple[MonitorTarget, ...] = ()
    stream: bool = False
    emit: Callable[[Event], None] = lambda event: None  # called from the model thread
    cancelled: bool = False  # set by the request side when the client goes away
    enqueued_at: float = field(default_factory=time.monotonic)


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a reply: the generation config's (often several for chat models) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.device = input_device(model)

    def run_batch(self, jobs: Sequence[GenerationJob]) -> None:
        """Generate every job's reply in one batch; a failure fails this batch's unfinished jobs, never the server."""
        jobs = [job for job in jobs if not job.cancelled]
        if not jobs:
            return
        tracker = None
        try:
            recorder = ProjectionRecorder([target for job in jobs for target in job.monitor])
            tracker = BatchTracker(jobs, self.tokenizer, self.eos_ids, recorder, RowGates())
            self._generate(jobs, tracker, recorder)
        except Exception as error:  # a bad batch must not take the model thread down
            log.exception("batch of %d failed", len(jobs))
            for index, job in enumerate(jobs):
                if tracker is None or not tracker.rows[index].done:
                    job.emit(Failed(f"generation failed: {type(error).__name__}"))

    def _generate(
        self, jobs: Sequence[GenerationJob], tracker: BatchTracker, recorder: ProjectionRecorder
    ) -> None:
        input_ids, attention_mask = left_pad([job.prompt_ids for job in jobs], self.pad_id)
        sampler = RowSampler(
            [job.sampling for job in jobs],
            prompt_width=input_ids.shape[1],
            eos_ids=self.eos_ids,
            device=self.device,
            row_done=tracker.row_done,
        )
        config = GenerationConfig(
            max_new_tokens=max(
                job.max_tokens + int(bool(job.monitor)) for job in jobs
            ),  # + monitor read-back
            do_sample=False,  # RowSampler draws the sampled rows
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        with (
            steer_rows(self.model, [job.interventions for job in jobs], gates=tracker.gates),
            block_hooks(self.model, recorder.hooks()),  # after the interventions: reads what later blocks see
            torch.inference_mode(),
        ):
            self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        tracker.finish_all("length")
