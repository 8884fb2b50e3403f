"""Prometheus metrics of one server (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
Z_BUCKETS = (-5, -3, -2, -1, 0, 1, 2, 3, 5)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "persona_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "persona_prompt_tokens", "Prompt tokens of finished replies", registry=registry
        )
        self.completion_tokens = Counter(
            "persona_completion_tokens", "Generated tokens of finished replies", registry=registry
        )
        self.latency = Histogram(
            "persona_request_latency_seconds",
            "Time from arrival to the last byte of a chat completion",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "persona_time_to_first_token_seconds",
            "Time from arrival to the first generated token (engine: every reply; static batcher: streams, to the "
            "first content chunk)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "persona_inter_token_latency_seconds",
            "Time between a reply's consecutive tokens (engine)",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.cache_usage = Gauge(
            "persona_kv_cache_usage_ratio",
            "Share of the paged KV cache's pages in use (engine; 0 on the static batcher)",
            registry=registry,
        )
        self.scheduler = Gauge(
            "persona_scheduler",
            "1 for the scheduling path this server runs: engine (continuous batching) or static (batcher)",
            ["path"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "persona_queue_wait_seconds",
            "Time a request waited for its batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "persona_batch_size",
            "Requests per forward step (engine) or per generate call (static)",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "persona_batch_duration_seconds",
            "Wall time of one batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "persona_queue_depth",
            "Requests waiting: for a batch (static), for a place in the running batch or cache pages (engine)",
            registry=registry,
        )
        self.in_flight = Gauge(
            "persona_requests_in_flight", "Chat completions being served", registry=registry
        )
        self.add_persona_metrics(registry)

    def add_persona_metrics(self, registry: CollectorRegistry) -> None:
        """What persona adds to a server's metrics: steering per trait, projection z-scores, alerts."""
        self.steered = Counter(
            "persona_steered_requests", "Requests steering along each trait", ["trait"], registry=registry
        )
        self.projection_z = Histogram(
            "persona_projection_z",
            "z-scores of monitored projections against the start-up baseline",
            ["trait", "kind"],
            buckets=Z_BUCKETS,
            registry=registry,
        )
        self.alerts = Counter(
            "persona_projection_alerts",
            "Replies whose monitored z-score passed the alert threshold",
            ["trait"],
            registry=registry,
        )

    def observe_batch_start(self, batch: Sequence, started: float) -> None:
        self.batch_size.observe(len(batch))
        for job in batch:
            self.queue_wait.observe(max(0.0, started - job.enqueued_at))

    def observe_monitor(self, report: dict[str, dict]) -> None:
        for trait, entry in report.items():
            for kind in ("prompt_last", "response_avg"):
                z = entry[kind]["z"]
                if z is not None:
                    self.projection_z.labels(trait, kind).observe(z)
            if entry["alert"]:
                self.alerts.labels(trait).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
