"""The server's state, built once at start-up: model, traits, baseline, scheduler, metrics; requests -> jobs.

The scheduler is the continuous-batching engine (:mod:`persona.serve.continuous`) wherever it can run, else the
static batcher (:mod:`persona.serve.batcher`); :func:`choose_scheduler` decides and says why, once, in the log.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from persona.data.chat import checked_messages, encode_chat, user_turn
from persona.generation.engine import EngineConfig
from persona.generation.engine.compat import unavailable
from persona.hooks import locate_blocks
from persona.models import context_length
from persona.serve.batcher import DynamicBatcher, QueueFull
from persona.serve.continuous import ContinuousBatcher
from persona.serve.engine import Engine, GenerationJob
from persona.serve.metrics import ServerMetrics
from persona.serve.monitoring import KINDS, NEUTRAL_PROMPTS, Baseline, monitor_report
from persona.serve.sampling import SamplingParams
from persona.serve.schema import ApiError, ChatCompletionRequest
from persona.serve.tracker import Finished
from persona.serve.traits import MonitorTarget, ResolvedPersona, Trait, resolve_persona

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    served_model_name: str
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 64
    default_max_tokens: int = 256
    max_context: int | None = None  # None: the model's own
    alert_z: float = 3.0
    api_key: str | None = field(default=None, repr=False)  # from the environment only; never printed
    scheduler: str = "auto"  # auto (the engine where it runs), engine, static
    kv_cache_tokens: int = 8192  # engine: tokens the paged KV cache holds, shared by every request
    max_batch_tokens: int = 256  # engine: tokens per forward (decoding rows + prompt chunks)
    page_size: int = 32  # engine: tokens per cache page

    def __post_init__(self) -> None:
        checks = {
            "max_batch": self.max_batch >= 1,
            "max_queue": self.max_queue >= 1,
            "max_wait_ms": 0 <= self.max_wait_ms < 60_000,
            "default_max_tokens": self.default_max_tokens >= 1,
            "max_context": self.max_context is None or self.max_context >= 2,
            "alert_z": math.isfinite(self.alert_z),
            "scheduler": self.scheduler in SCHEDULERS,
            "kv_cache_tokens": self.kv_cache_tokens >= self.page_size >= 1,
            "max_batch_tokens": self.max_batch_tokens >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"--{name}={getattr(self, name)!r} is out of range. Fix: see `persona serve --help`."
                )


SCHEDULERS = ("auto", "engine", "static")


def choose_scheduler(model, requested: str) -> tuple[str, str]:
    """("engine" | "static", why): the engine wherever it can run unless ``requested`` is ``static``."""
    if requested == "static":
        return "static", "--scheduler static"
    why_not = unavailable(model)
    if why_not is None:
        return "engine", "transformers' continuous batching runs this model"
    if requested == "engine":
        raise ValueError(f"--scheduler engine: {why_not} Fix: --scheduler auto (or static).")
    return "static", why_not


def engine_config(settings: ServeSettings) -> EngineConfig:
    return EngineConfig(
        num_blocks=-(-settings.kv_cache_tokens // settings.page_size),
        page_size=settings.page_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_requests_per_batch=settings.max_batch,
        max_queue_size=settings.max_batch + settings.max_queue,
    )


def make_scheduler(model, tokenizer, settings: ServeSettings, metrics: ServerMetrics):
    """("engine", ContinuousBatcher) or ("static", DynamicBatcher), as :func:`choose_scheduler` (and the engine's
    start) allow; the log says which and why."""
    scheduler, why = choose_scheduler(model, settings.scheduler)
    if scheduler == "engine":
        config = engine_config(settings)
        try:
            batcher = ContinuousBatcher(
                model, tokenizer, config, max_queue=settings.max_queue, metrics=metrics
            )
        except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError) as error:
            if settings.scheduler == "engine":
                raise
            why = f"the engine did not start: {type(error).__name__}: {error}"
        else:
            log.info("scheduling: the continuous-batching engine (%s; a request holds up to %d tokens of a "
                     "%d-token KV cache)", why, batcher.engine.max_request_tokens, settings.kv_cache_tokens)  # fmt: skip
            return "engine", batcher
    log.info("scheduling: the static batcher, one generate per batch (%s)", why)
    batcher = DynamicBatcher(
        Engine(model, tokenizer).run_batch,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        metrics=metrics,
    )
    return "static", batcher


def model_context_length(model, tokenizer) -> int:
    """Positions the model can attend over (:func:`persona.models.context_length` of its config and tokenizer)."""
    value = context_length(tokenizer, model.config)
    if value is None:
        raise ValueError("Cannot tell the model's context length. Fix: pass --max_context.")
    return value


class PersonaService:
    def __init__(self, model, tokenizer, traits: dict[str, Trait], settings: ServeSettings):
        self.settings = settings
        self.traits = traits
        self.tokenizer = tokenizer
        # The request side tokenizes on the event loop while the model thread decodes: a fast tokenizer
        # is not safe to share between threads ("Already borrowed"), so each side has its own.
        self.request_tokenizer = copy.deepcopy(tokenizer)
        self.num_layers = locate_blocks(model).num_layers
        self.context_length = settings.max_context or model_context_length(model, tokenizer)
        self.metrics = ServerMetrics()
        self.scheduler, self.batcher = make_scheduler(model, tokenizer, settings, self.metrics)
        if (
            self.scheduler == "engine"
        ):  # what one request may hold in the cache, less a monitored read-back step
            self.context_length = min(self.context_length, self.batcher.engine.max_request_tokens - 1)
        self.metrics.scheduler.labels(self.scheduler).set(1)
        self.baseline = Baseline({})
        self.created = int(time.time())

    def measure_baseline(self, prompts: Sequence[str] = NEUTRAL_PROMPTS, max_tokens: int = 32) -> Baseline:
        """Greedy replies to neutral prompts, every trait monitored at its default layer (before serving)."""
        targets = tuple(
            MonitorTarget(t.name, t.default_layer, t.direction(t.default_layer)) for t in self.traits.values()
        )
        values: dict[tuple[str, str], list] = {(t.trait, kind): [] for t in targets for kind in KINDS}

        def collect(event) -> None:
            if isinstance(event, Finished):
                for target, projections in event.projections:
                    for kind, value in zip(KINDS, projections, strict=True):
                        values[(target.trait, kind)].append(value)

        jobs = [
            GenerationJob(
                encode_chat(self.tokenizer, user_turn(p)), max_tokens, monitor=targets, emit=collect
            )
            for p in prompts
        ]
        for start in range(0, len(jobs), self.settings.max_batch):
            self.batcher.run_batch(jobs[start : start + self.settings.max_batch])
        self.baseline = Baseline.from_values(values)
        return self.baseline

    def prepare(self, request: ChatCompletionRequest) -> tuple[GenerationJob, ResolvedPersona]:
        """Validate a request against this server (404 model/trait, 400 layer/messages, 413 context) -> a job."""
        if request.model != self.settings.served_model_name:
            raise ApiError(
                404,
                f"model {request.model!r} is not served here; this server serves "
                f"{self.settings.served_model_name!r} (see /v1/models).",
                param="model",
                code="model_not_found",
            )
        resolved = resolve_persona(request.persona, self.traits, self.num_layers)
        try:
            turns = checked_messages([m.as_chat_turn() for m in request.messages], "request")
        except ValueError as error:  # the CLI's rule for chat records (roles, content, order)
            raise ApiError(400, str(error), param="messages") from None
        try:
            prompt_ids = encode_chat(self.request_tokenizer, turns)
        except ValueError as error:
            raise ApiError(400, f"messages: {error}", param="messages") from None
        job = GenerationJob(
            prompt_ids=prompt_ids,
            max_tokens=self._max_tokens(len(prompt_ids), request.requested_max_tokens()),
            sampling=SamplingParams(request.temperature, request.top_p, request.seed, request.min_tokens),
            stop=request.stop_sequences(),
            interventions=resolved.interventions,
            monitor=resolved.monitor,
            stream=request.stream,
        )
        return job, resolved

    def _max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        room = self.context_length - prompt_tokens
        if room < 1 or (requested is not None and requested > room):
            asked = "" if requested is None else f" plus max_tokens={requested}"
            raise ApiError(
                413,
                f"The prompt has {prompt_tokens} tokens{asked}; the context holds {self.context_length}. "
                "Fix: shorten the messages or lower max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        return min(requested or self.settings.default_max_tokens, room)

    def submit(self, job: GenerationJob, resolved: ResolvedPersona) -> None:
        try:
            self.batcher.submit(job)
        except QueueFull:
            raise ApiError(
                429,
                f"The server's queue is full ({self.settings.max_queue} requests waiting). Fix: retry after a moment.",
                code="queue_full",
            ) from None
        for item in resolved.applied.get("steer", []):
            self.metrics.steered.labels(item["trait"]).inc()

    def persona_reply(self, resolved: ResolvedPersona, finished: Finished) -> dict:
        """The reply's ``persona`` field: what was applied, and the monitoring report (recorded in metrics)."""
        reply = copy.deepcopy(resolved.applied)
        for index, (kind, place) in resolved.gated.items():
            reply[kind][place]["when"]["fired"] = finished.fired.get(index)  # None: a no-op entry (coef 0)
        if resolved.monitor:
            projections = [(t, tuple(_finite(v) for v in values)) for t, values in finished.projections]
            report = monitor_report(projections, self.baseline, self.settings.alert_z)
            self.metrics.observe_monitor(report)
            reply.update(
                monitor=report, alert=any(e["alert"] for e in report.values()), alert_z=self.settings.alert_z
            )
        self.metrics.prompt_tokens.inc(finished.prompt_tokens)
        self.metrics.completion_tokens.inc(finished.completion_tokens)
        return reply

    def describe_model(self) -> dict:
        return {
            "id": self.settings.served_model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "persona",
            "persona": {
                "num_layers": self.num_layers,
                "context_length": self.context_length,
                "alert_z": self.settings.alert_z,
                "traits": {
                    name: {**trait.describe(), "baseline": self.baseline.describe(name)}
                    for name, trait in self.traits.items()
                },
            },
        }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
