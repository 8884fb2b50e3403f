"""Load check of `persona serve` on loopback: batched vs one at a time, and the cost of per-request steering.

One model, two servers in this process on free loopback ports: ``max_batch = clients`` (batched) and
``max_batch = 1`` (one at a time). In each phase ``--clients`` threads with the official openai client
send ``--requests`` chat completions each, one after another; every reply is exactly ``--max-tokens``
long (``min_tokens`` = ``max_tokens``), so phases do the same work. Four phases: one at a time and
batched with mixed persona settings (plain, steered, monitored, ablated), and batched with no request
steered vs every request steered (a different coefficient per client), interleaved over ``--repeats``
rounds. Prints each phase's throughput and p50/p95 latency, then best-of-N and median ratios: batched /
one-at-a-time throughput (target >= 3 at 8 clients) and the steering overhead (target <= 5 %), end to
end and inside one batch (the engine alone, free of HTTP and batch-formation noise).
Bounded: clients x requests per phase, and no new request after --max-seconds in a phase. ``--scheduler``
picks what both servers run on (auto: the engine where it runs).

``--workload mixed`` and ``--workload head-of-line``: the static batcher against the continuous-batching engine at
the same ``--max-batch`` (see ``serve_workloads.py``).

Usage: python bench/serve.py [--clients 8] [--requests 2] [--max-tokens 32] [--repeats 3] [--scheduler auto]
       python bench/serve.py --workload mixed [--total 32] [--rate 2] [--min-len 8] [--max-len 512] [--max-batch 8]
       python bench/serve.py --workload head-of-line [--long 192] [--short 8] [--delay 1] [--max-batch 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import openai  # noqa: E402
import torch  # noqa: E402
from common import QUESTIONS  # noqa: E402
from serve_workloads import head_of_line, mixed  # noqa: E402

from persona.data.chat import encode_chat, user_turn  # noqa: E402
from persona.hooks import locate_blocks  # noqa: E402
from persona.hooks.layers import hidden_size
from persona.models import load_model_and_tokenizer, model_short_name  # noqa: E402
from persona.serve.app import create_app  # noqa: E402
from persona.serve.engine import GenerationJob  # noqa: E402
from persona.serve.sampling import SamplingParams  # noqa: E402
from persona.serve.schema import PersonaFields  # noqa: E402
from persona.serve.server import serve_in_thread  # noqa: E402
from persona.serve.service import PersonaService, ServeSettings  # noqa: E402
from persona.serve.traits import load_traits, resolve_persona  # noqa: E402

MIXED = [
    {},
    {"steer": [{"trait": "evil", "coef": -2.0}]},
    {"monitor": ["evil"]},
    {"steer": [{"trait": "evil", "coef": 2.0}], "monitor": ["evil"]},
    {"ablate": ["evil"]},
    {"steer": [{"trait": "evil", "coef": 1.0, "positions": "all"}]},
]
PLAIN = [{}]
STEERED = [{"steer": [{"trait": "evil", "coef": coef}]} for coef in (-2.0, -1.0, 1.0, 2.0)]


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0

    def line(self) -> str:
        p50, p95 = percentile(self.latencies, 50), percentile(self.latencies, 95)
        return (
            f"{self.name:>22}: {len(self.latencies)} requests, {self.tokens} tokens in {self.wall:.1f} s = "
            f"{self.tokens / self.wall:.1f} tokens/s, {len(self.latencies) / self.wall:.2f} requests/s; "
            f"latency p50 {p50:.2f} s, p95 {p95:.2f} s" + (f"; {self.errors} errors" if self.errors else "")
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def run_phase(name: str, url: str, model_id: str, personas: list[dict], args) -> Phase:
    phase, lock = Phase(name), threading.Lock()
    start_gate = threading.Barrier(args.clients + 1)
    deadline = time.monotonic() + args.max_seconds

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
        start_gate.wait()
        for number in range(args.requests):
            if time.monotonic() > deadline:
                return
            turn = index * args.requests + number
            started = time.monotonic()
            try:
                reply = client.chat.completions.create(
                    model=model_id,
                    messages=[{"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}],
                    max_tokens=args.max_tokens,
                    temperature=0,
                    extra_body={"persona": personas[turn % len(personas)], "min_tokens": args.max_tokens},
                )
            except openai.APIError:
                with lock:
                    phase.errors += 1
                continue
            with lock:
                phase.latencies.append(time.monotonic() - started)
                phase.tokens += reply.usage.completion_tokens

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join()
    phase.wall = time.monotonic() - began
    return phase


def mean_batch(service: PersonaService) -> float:
    registry = service.metrics.registry
    count = registry.get_sample_value("persona_batch_size_count") or 0
    return (registry.get_sample_value("persona_batch_size_sum") or 0) / max(count, 1)


def engine_steering_overhead(service: PersonaService, args) -> tuple[float, float]:
    """Steering cost inside one batch, without HTTP or batch formation: ``run_batch`` of the same jobs,
    none steered vs each row steered with its own coefficient, interleaved; (best-of-N, median) ratios."""
    tokenizer, traits = service.tokenizer, service.traits
    prompts = [encode_chat(tokenizer, user_turn(question)) for question in QUESTIONS[: args.clients]]

    def jobs(steered: bool) -> list[GenerationJob]:
        made = []
        for index, prompt in enumerate(prompts):
            persona = STEERED[index % len(STEERED)] if steered else {}
            resolved = resolve_persona(PersonaFields.model_validate(persona), traits, service.num_layers)
            sampling = SamplingParams(min_tokens=args.max_tokens)
            made.append(
                GenerationJob(prompt, args.max_tokens, sampling, interventions=resolved.interventions)
            )
        return made

    def timed(steered: bool) -> float:
        batch = jobs(steered)
        started = time.perf_counter()
        service.batcher.run_batch(batch)
        return time.perf_counter() - started

    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(2 * args.repeats):
        for steered in (False, True) if repeat % 2 == 0 else (True, False):
            times[steered].append(timed(steered))
    paired = [s / p for s, p in zip(times[True], times[False], strict=True)]
    return min(times[True]) / min(times[False]), statistics.median(paired)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--vectors", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="per client and phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the four phases, interleaved")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="per phase")
    parser.add_argument("--scheduler", default="auto", choices=["auto", "engine", "static"])
    parser.add_argument("--workload", default="load", choices=["load", "mixed", "head-of-line"])
    parser.add_argument("--max-batch", type=int, default=8, help="mixed, head-of-line: both servers' batch")
    parser.add_argument("--total", type=int, default=32, help="mixed: requests")
    parser.add_argument("--rate", type=float, default=2.0, help="mixed: Poisson arrivals per second")
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--tail", type=float, default=1.0, help="mixed: Pareto shape of the reply lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long", type=int, default=192)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--delay", type=float, default=1.0)
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model)
    layout = locate_blocks(model)
    vectors = args.vectors or f"persona_vectors/{model_short_name(args.model)}"
    traits = load_traits(vectors, num_layers=layout.num_layers, hidden_size=hidden_size(layout))
    name = model_short_name(args.model)

    def service(max_batch: int, scheduler: str = args.scheduler) -> PersonaService:
        settings = ServeSettings(
            name, max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=4 * max(args.clients, args.total),
            scheduler=scheduler,
        )  # fmt: skip
        return PersonaService(model, tokenizer, traits, settings)

    if args.workload != "load":
        return static_against_engine(service, name, args)
    batched, single = service(args.clients), service(1)
    single.baseline = batched.measure_baseline(max_tokens=16)
    print(
        f"model={args.model} clients={args.clients} requests/client={args.requests} max_tokens={args.max_tokens} "
        f"max_wait_ms={args.max_wait_ms} torch threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"machine={platform.machine()} {platform.processor() or ''}".rstrip()
    )
    phases: dict[str, list[Phase]] = {label: [] for label in PHASES}
    with (
        serve_in_thread(create_app(batched)) as batched_url,
        serve_in_thread(create_app(single)) as single_url,
    ):
        urls = {"batched": batched_url, "single": single_url}
        warm = argparse.Namespace(**{**vars(args), "clients": 1, "requests": 1})
        for url in urls.values():
            run_phase("warm-up", url, name, MIXED, warm)
        for repeat in range(args.repeats):
            # Interleaved, order flipped every repeat: load from other processes hits every phase alike.
            for label in PHASES if repeat % 2 == 0 else list(PHASES)[::-1]:
                server, personas = PHASES[label]
                phases[label].append(run_phase(label, urls[server], name, personas, args))
                print(phases[label][-1].line())
    print(f"mean batch size of the batched server: {mean_batch(batched):.1f}")
    summarize(phases, args.repeats)
    fresh = service(args.clients)  # the servers' schedulers stopped with them
    best, paired = engine_steering_overhead(fresh, args)
    if fresh.scheduler == "engine":
        fresh.batcher.engine.close()
    print(
        f"steering overhead inside a batch of {args.clients} (engine only, {2 * args.repeats} runs each): "
        f"{best - 1:+.1%} best-of, {paired - 1:+.1%} median of paired runs (target <= 5 %)"
    )


def static_against_engine(service, name: str, args) -> None:
    """The static batcher and the engine at the same --max-batch, one model, served side by side."""
    static, engine = service(args.max_batch, "static"), service(args.max_batch, "engine")
    engine.baseline = static.measure_baseline(max_tokens=16)
    print(
        f"model={args.model} max_batch={args.max_batch} torch threads={torch.get_num_threads()} "
        f"cpus={os.cpu_count()} machine={platform.machine()} {platform.processor() or ''}".rstrip()
    )
    with (
        serve_in_thread(create_app(static)) as static_url,
        serve_in_thread(create_app(engine)) as engine_url,
    ):
        urls = {"static": static_url, "engine": engine_url}
        for url in urls.values():  # warm-up
            openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0).chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
        (mixed if args.workload == "mixed" else head_of_line)(urls, name, args)


PHASES = {
    "one at a time (mixed)": ("single", MIXED),
    "batched (mixed)": ("batched", MIXED),
    "batched, no steering": ("batched", PLAIN),
    "batched, all steered": ("batched", STEERED),
}


def summarize(phases: dict[str, list[Phase]], repeats: int) -> None:
    """Best-of-N throughput (resists load from other processes) and the median of the paired repeats."""

    def throughput(phase: Phase) -> float:
        return phase.tokens / phase.wall

    def ratios(top: str, bottom: str) -> tuple[float, float]:
        best = max(map(throughput, phases[top])) / max(map(throughput, phases[bottom]))
        paired = [throughput(a) / throughput(b) for a, b in zip(phases[top], phases[bottom], strict=True)]
        return best, statistics.median(paired)

    best, paired = ratios("batched (mixed)", "one at a time (mixed)")
    print(
        f"batched / one-at-a-time throughput: {best:.2f}x best-of-{repeats}, {paired:.2f}x median (target >= 3)"
    )
    one, together = phases["one at a time (mixed)"], phases["batched (mixed)"]
    p50 = statistics.median(
        percentile(a.latencies, 50) / percentile(b.latencies, 50) for a, b in zip(one, together, strict=True)
    )
    print(f"p50 latency, one-at-a-time / batched: {p50:.2f}x median")
    best, paired = ratios("batched, no steering", "batched, all steered")
    print(
        f"steering overhead (plain / steered throughput - 1): {best - 1:+.1%} best-of-{repeats}, "
        f"{paired - 1:+.1%} median (target <= 5 %)"
    )


if __name__ == "__main__":
    main()
