"""The continuous-batching engine (#23) against today's static path, one process, ratios printed.

Head of line: a short request (``--short`` new tokens) arrives ``--delay`` s after a long reply (``--long`` new
tokens) started. Static (today's server: one ``generate`` per batch, arrivals wait for the next batch): the short
request waits for the long batch to end, then runs. Engine: it joins the running batch at the next step. Each is
reported as its latency behind the long reply over its latency alone (the issue's target: <= 1.5).

Mixed reply lengths: ``--requests`` prompts whose reply lengths cycle through ``--lengths``, EOS off. Static:
batches of ``--batch`` through ``generate`` under ``steer_rows``, each running to its longest reply. Engine: all
submitted at once, ``--batch`` rows per step. Useful tokens/s for both, unsteered and every request steered
(``response`` at the middle layer).

    python bench/engine.py [--model smollm2-135m] [--threads 2] [--long 192] [--short 8] [--requests 16]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from common import QUESTIONS

from persona.data.batches import left_pad
from persona.data.chat import encode_chat
from persona.generation.engine import Engine, EngineConfig, EngineRequest
from persona.models import load_model_and_tokenizer
from persona.steering import RowInterventions, SteeringSpec, steer_rows


def static_generate(model, prompts, new_tokens, rows) -> list[list[int]]:
    """Today's batch: left-padded, one greedy ``generate`` to the longest reply, per-row interventions."""
    ids, mask = left_pad(prompts, pad_id=0)
    longest = max(new_tokens)
    with torch.no_grad(), steer_rows(model, rows):  # EOS held off (min_new_tokens), as the engine's requests
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=0,
        )
    return [out[row, ids.shape[1] : ids.shape[1] + n].tolist() for row, n in enumerate(new_tokens)]


def static_head_of_line(model, long_prompt, short_prompt, args) -> float:
    """Seconds from the short request's arrival to its reply, when it arrives while the long batch runs."""
    busy = threading.Lock()

    def long_batch():
        with busy:
            static_generate(model, [long_prompt], [args.long], [RowInterventions()])

    worker = threading.Thread(target=long_batch)
    worker.start()
    time.sleep(args.delay)
    arrived = time.perf_counter()
    with busy:  # the batcher runs one generate at a time: the short request is in the next batch
        static_generate(model, [short_prompt], [args.short], [RowInterventions()])
    latency = time.perf_counter() - arrived
    worker.join()
    return latency


def engine_head_of_line(engine, long_prompt, short_prompt, args) -> float:
    long_id = engine.submit(EngineRequest(long_prompt, args.long))
    time.sleep(args.delay)
    arrived = time.perf_counter()
    engine.result(engine.submit(EngineRequest(short_prompt, args.short)))
    latency = time.perf_counter() - arrived
    engine.result(long_id)
    return latency


def alone(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def head_of_line(model, engine, prompts, args) -> None:
    long_prompt, short_prompt = prompts[0], prompts[1]
    static_generate(model, [short_prompt], [2], [RowInterventions()])  # warm both paths once
    engine.result(engine.submit(EngineRequest(short_prompt, 2)))
    static_alone = alone(lambda: static_generate(model, [short_prompt], [args.short], [RowInterventions()]))
    static_behind = static_head_of_line(model, long_prompt, short_prompt, args)
    engine_alone = alone(lambda: engine.result(engine.submit(EngineRequest(short_prompt, args.short))))
    engine_behind = engine_head_of_line(engine, long_prompt, short_prompt, args)
    print(f"head of line: a {args.short}-token request {args.delay} s into a {args.long}-token reply")
    print(
        f"  static: {static_behind:6.2f} s behind vs {static_alone:5.2f} s alone = x{static_behind / static_alone:.2f}"
    )
    print(
        f"  engine: {engine_behind:6.2f} s behind vs {engine_alone:5.2f} s alone = x{engine_behind / engine_alone:.2f}"
    )


def mixed(model, engine, prompts, args, spec) -> dict:
    lengths = [args.lengths[i % len(args.lengths)] for i in range(args.requests)]
    chosen = [prompts[i % len(prompts)] for i in range(args.requests)]
    useful = sum(lengths)
    speeds = {}
    for steered in (False, True):
        rows = [RowInterventions([spec] if steered else []) for _ in chosen]
        start = time.perf_counter()
        for first in range(0, len(chosen), args.batch):
            part = slice(first, first + args.batch)
            static_generate(model, chosen[part], lengths[part], rows[part])
        speeds["static", steered] = useful / (time.perf_counter() - start)
        start = time.perf_counter()
        ids = [engine.submit(EngineRequest(p, n, r)) for p, n, r in zip(chosen, lengths, rows, strict=True)]
        for request_id in ids:
            engine.result(request_id)
        speeds["engine", steered] = useful / (time.perf_counter() - start)
    print(f"mixed reply lengths: {args.requests} requests, lengths {args.lengths}, {useful} useful tokens")
    for (path, steered), speed in speeds.items():
        print(f"  {path:6s} {'steered  ' if steered else 'unsteered'} {speed:7.1f} tokens/s")
    for steered in (False, True):
        name = "steered" if steered else "unsteered"
        print(f"  engine / static ({name}): x{speeds['engine', steered] / speeds['static', steered]:.2f}")
    print(f"  engine steered / unsteered: x{speeds['engine', True] / speeds['engine', False]:.3f}")
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long", type=int, default=192)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 24, 32, 48, 64, 96, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--num-blocks", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    layers = model.config.num_hidden_layers
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    spec = SteeringSpec(layers // 2, direction / direction.norm(), args.coef)
    print(f"{args.model}, {args.threads} threads, torch {torch.__version__}")
    config = EngineConfig(
        num_blocks=args.num_blocks, page_size=32, max_batch_tokens=256, max_requests_per_batch=args.batch
    )
    with Engine(model, config) as engine:
        head_of_line(model, engine, prompts, args)
        mixed(model, engine, prompts, args, spec)


if __name__ == "__main__":
    main()
