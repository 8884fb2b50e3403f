"""``bench/steer.py --workload generate``: a ``persona generate``-style run, the static path vs the engine (#23).

``--requests`` persona-prompted answers (the evil trait's extract questions under its pos instructions, cycled),
greedy, each with its own reply cap drawn log-uniformly from 8..``--max-new`` (long-tailed: most short, a few
long) and EOS on, so replies end by EOS or by their cap. Old: the static path of ``persona generate`` -- fixed
batches of ``--batch`` answers in plan order, one ``generate`` per batch run to its longest cap, each row cut at
its own cap afterwards. New: every answer submitted to one engine at once (``--batch`` requests per step), each
leaving the step it ends. Both count the same useful tokens (each row's reply up to EOS or its cap; the two paths'
replies are compared token for token and the count printed). Then the engine again with every answer steered.

    python bench/steer.py --workload generate [--batch 16] [--requests 32] [--max-new 256] [--threads 2]
"""

from __future__ import annotations

import time

import torch
from common import resolved_dtype, synchronize

from persona.data.batches import left_pad
from persona.data.chat import encode_chat
from persona.data.traits import load_trait
from persona.generation.engine import Engine, EngineRequest
from persona.generation.journal import plan_items
from persona.generation.on_engine import engine_config, stop_ids, stream_results
from persona.models import load_model, load_tokenizer
from persona.steering import RowInterventions, SteeringSpec, steer


def workload(tokenizer, requests: int, longest: int) -> tuple[list[list[int]], list[int]]:
    """Prompts (token ids) and each answer's reply cap: log-uniform over 8..longest, seeded."""
    items = plan_items(load_trait("evil", "extract"), "pos", None, 1)
    prompts = [encode_chat(tokenizer, items[i % len(items)].messages()) for i in range(requests)]
    draw = torch.rand(requests, generator=torch.Generator().manual_seed(0))
    caps = (8 * (longest / 8) ** draw).round().long().clamp(8, longest).tolist()
    return prompts, caps


def cut(tokens: list[int], cap: int, stops: list[int]) -> list[int]:
    """A reply up to and including its first stop token, at most ``cap`` tokens."""
    tokens = tokens[:cap]
    ends = [index for index, token in enumerate(tokens) if token in stops]
    return tokens[: ends[0] + 1] if ends else tokens


def static_run(model, prompts, caps, specs, batch: int, pad_id: int, stops, device) -> list[list[int]]:
    """persona generate's static path: fixed batches in plan order, each to its longest cap, EOS on."""
    replies = []
    with torch.inference_mode(), steer(model, specs):
        for first in range(0, len(prompts), batch):
            ids, mask = left_pad(prompts[first : first + batch], pad_id)
            part = caps[first : first + batch]
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(part),
                                 min_new_tokens=1, do_sample=False, pad_token_id=pad_id)  # fmt: skip
            new = out[:, ids.shape[1] :].tolist()
            replies += [cut(row, cap, stops) for row, cap in zip(new, part, strict=True)]
    return replies


def engine_run(engine, prompts, caps, specs, batch: int, stops) -> list[list[int]]:
    rows = RowInterventions(specs)
    requests = [EngineRequest(p, cap, rows, stop_token_ids=stops, min_new_tokens=1) for p, cap in zip(prompts, caps, strict=True)]  # fmt: skip
    replies: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for index, result in stream_results(engine, requests, 4 * batch):
            replies[index] = result.tokens
    return replies


def run_generate_workload(args) -> None:
    device = args.device
    dtype = resolved_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=str(dtype).removeprefix("torch."), device=device)
    prompts, caps = workload(tokenizer, args.requests, args.max_new)
    stops, pad_id = stop_ids(model, tokenizer), tokenizer.pad_token_id
    layer = args.layer if args.layer is not None else round(0.6 * model.config.num_hidden_layers)
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    spec = SteeringSpec(layer, vector / vector.norm(), args.coef, positions="response")
    print(f"model={args.model} device={device} dtype={dtype} threads={torch.get_num_threads()} batch={args.batch} "
          f"requests={args.requests} caps 8..{args.max_new} (mean {sum(caps) / len(caps):.0f}, max {max(caps)})")  # fmt: skip
    config = engine_config(args.batch, max(len(p) for p in prompts), args.max_new)
    started = time.perf_counter()
    with Engine(model, config) as engine:
        print(f"engine start {time.perf_counter() - started:.2f} s ({config})")
        engine_run(engine, prompts[:2], [4, 4], [], args.batch, stops)  # warm both paths once
        static_run(model, prompts[:2], [4, 4], [], args.batch, pad_id, stops, device)
        speeds, replies = {}, {}
        runs = {
            "static unsteered": lambda: static_run(
                model, prompts, caps, [], args.batch, pad_id, stops, device
            ),
            "engine unsteered": lambda: engine_run(engine, prompts, caps, [], args.batch, stops),
            "engine steered": lambda: engine_run(engine, prompts, caps, [spec], args.batch, stops),
        }
        for repeat in range(args.repeats):
            for name, fn in runs.items():
                synchronize(device)
                start = time.perf_counter()
                replies[name] = fn()
                synchronize(device)
                seconds = time.perf_counter() - start
                useful = sum(len(reply) for reply in replies[name])
                speeds.setdefault(name, []).append(useful / seconds)
                print(f"  {repeat + 1}/{args.repeats} {name:17s} {useful} tokens in {seconds:6.2f} s = {useful / seconds:6.1f} tokens/s")  # fmt: skip
    report(speeds, replies)


def report(speeds: dict, replies: dict) -> None:
    best = {name: max(values) for name, values in speeds.items()}
    same = sum(a == b for a, b in zip(replies["static unsteered"], replies["engine unsteered"], strict=True))
    lengths = [len(reply) for reply in replies["engine unsteered"]]
    print(
        f"reply lengths: min {min(lengths)}, median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}"
    )
    print(f"engine replies equal to the static path's: {same}/{len(lengths)} (greedy)")
    for name, value in best.items():
        print(f"{name:17s}: {value:7.1f} tokens/s (best of {len(speeds[name])})")
    print(
        f"engine / static (unsteered): x{best['engine unsteered'] / best['static unsteered']:.2f} (target >= 1.3)"
    )
    cost = best["engine unsteered"] / best["engine steered"] - 1
    print(f"engine, every answer steered vs none: {cost:+.1%} time per token (target <= 5 %)")
