"""`bench/serve.py --workload mixed | head-of-line`: the static batcher against the engine, one model, one process.

Two servers on free loopback ports serve the same model at the same concurrency (``--max-batch``): one on the
static batcher (``--scheduler static``), one on the continuous-batching engine. Every request is a streaming
chat completion from the official openai client; reply lengths are fixed by ``min_tokens = max_tokens``, so both
servers do the same work.

- ``mixed``: ``--total`` requests with Poisson arrivals (``--rate`` per second), reply lengths from a truncated
  Pareto (``--min-len`` .. ``--max-len``, shape ``--tail``: most short, a few long), every second request steered
  or monitored. The same arrival schedule, lengths and personas hit each server in turn. Prints throughput,
  p50/p99 latency and p50/p99 time to first token per server, then engine/static ratios.
- ``head-of-line``: a ``--short``-token request alone, then the same request sent ``--delay`` s after a
  ``--long``-token reply started; its latency behind the long reply over its latency alone, per server.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import openai
from common import QUESTIONS

MIXED_PERSONAS = [
    {},
    {"steer": [{"trait": "evil", "coef": -2.0}]},
    {},
    {"monitor": ["evil"]},
]


@dataclass
class Reply:
    latency: float
    first_token: float
    tokens: int


@dataclass
class Run:
    replies: list[Reply] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0

    def throughput(self) -> float:
        return sum(r.tokens for r in self.replies) / self.wall

    def pct(self, what: str, q: float) -> float:
        values = sorted(getattr(r, what) for r in self.replies)
        return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")

    def line(self, name: str) -> str:
        return (
            f"  {name:>6}: {len(self.replies)} replies ({self.errors} errors), {self.throughput():6.1f} tokens/s; "
            f"latency p50 {self.pct('latency', 50):6.2f} s p99 {self.pct('latency', 99):6.2f} s; "
            f"first token p50 {self.pct('first_token', 50):5.2f} s p99 {self.pct('first_token', 99):5.2f} s"
        )


def stream_one(client, model_id: str, question: str, tokens: int, persona: dict) -> Reply:
    """One streamed reply of exactly ``tokens`` tokens: (latency, time to first content, tokens)."""
    started = time.monotonic()
    first, count = None, 0
    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": question}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"persona": persona, "min_tokens": tokens},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - started
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    latency = time.monotonic() - started
    return Reply(latency, latency if first is None else first, count)


def mixed_schedule(args) -> list[tuple[float, int, dict]]:
    """(arrival offset s, reply length, persona) per request: Poisson arrivals, truncated-Pareto lengths."""
    rng = random.Random(args.seed)
    schedule, at = [], 0.0
    for index in range(args.total):
        at += rng.expovariate(args.rate)
        length = min(args.max_len, round(args.min_len * (1 - rng.random()) ** (-1 / args.tail)))
        schedule.append((at, length, MIXED_PERSONAS[index % len(MIXED_PERSONAS)]))
    return schedule


def run_mixed(url: str, model_id: str, schedule, timeout: float) -> Run:
    run, lock = Run(), threading.Lock()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout)

    def send(index: int, length: int, persona: dict) -> None:
        try:
            reply = stream_one(client, model_id, QUESTIONS[index % len(QUESTIONS)], length, persona)
        except openai.APIError:
            with lock:
                run.errors += 1
            return
        with lock:
            run.replies.append(reply)

    began = time.monotonic()
    threads = []
    for index, (at, length, persona) in enumerate(schedule):
        time.sleep(max(0.0, began + at - time.monotonic()))
        threads.append(threading.Thread(target=send, args=(index, length, persona)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    run.wall = time.monotonic() - began
    return run


def mixed(urls: dict[str, str], model_id: str, args) -> None:
    schedule = mixed_schedule(args)
    lengths = [length for _, length, _ in schedule]
    print(
        f"mixed: {len(schedule)} requests, Poisson {args.rate}/s over {schedule[-1][0]:.0f} s, reply lengths "
        f"{min(lengths)}..{max(lengths)} (median {statistics.median(lengths):.0f}, {sum(lengths)} tokens), "
        f"half steered or monitored, max_batch {args.max_batch}"
    )
    runs = {}
    for name in ("static", "engine"):
        runs[name] = run_mixed(urls[name], model_id, schedule, args.max_seconds)
        print(runs[name].line(name))
    static, engine = runs["static"], runs["engine"]
    print(f"  throughput engine / static: x{engine.throughput() / static.throughput():.2f} (target >= 1.5)")
    for what, label in (("latency", "latency"), ("first_token", "time to first token")):
        for q in (50, 99):
            ratio = static.pct(what, q) / engine.pct(what, q)
            print(
                f"  p{q} {label}, static / engine: x{ratio:.2f} lower"
                + (" (target >= 2)" if q == 99 and what == "latency" else "")
            )


def head_of_line(urls: dict[str, str], model_id: str, args) -> None:
    """Per server and round: the short request alone, then behind the long reply; best and median ratios."""
    print(f"head of line: a {args.short}-token request {args.delay} s into a {args.long}-token reply")
    for name in ("static", "engine"):
        client = openai.OpenAI(base_url=f"{urls[name]}/v1", api_key="bench", max_retries=0, timeout=600)
        alone, behind = [], []
        for _ in range(args.repeats):
            alone.append(stream_one(client, model_id, QUESTIONS[1], args.short, {}).latency)
            long = threading.Thread(target=stream_one, args=(client, model_id, QUESTIONS[0], args.long, {}))
            long.start()
            time.sleep(args.delay)
            behind.append(stream_one(client, model_id, QUESTIONS[1], args.short, {}).latency)
            long.join()
        ratios = [b / a for a, b in zip(alone, behind, strict=True)]
        target = " (target <= 1.5)" if name == "engine" else ""
        print(
            f"  {name:>6}: {min(behind):6.2f} s behind vs {min(alone):5.2f} s alone (best of {args.repeats}) = "
            f"x{min(behind) / min(alone):.2f}{target}; median of rounds x{statistics.median(ratios):.2f}"
        )
