"""Generation speed and the cost of steering: the plain (eager) path vs the fast path, unsteered vs steered, one process.

For each generation path (``eager``: dynamic KV cache, what `generate_steered(fast=False)` runs; ``static``: static
cache without compile; ``compile``: static cache + compiled decode step, what ``fast="auto"`` runs on CUDA), greedy
``generate`` of batch x new tokens, unsteered and steered, interleaved over the repeats. Prints tokens/s, the time
per decode step ((whole run - prefill-only run) / (new tokens - 1)), the fraction of the memory-bandwidth bound it
reaches (the bound's arithmetic is printed), steered/unsteered (target <= 1.05) and each path's speed-up over eager.

    python bench/steer.py [--device cuda] [--dtype bfloat16] [--model M] [--batch 64] [--new-tokens 128]
                          [--paths eager,compile] [--repeats 3] [--layer L] [--coef 4]

``--workload generate`` (:mod:`generate_workload`): a ``persona generate``-style run with mixed reply lengths, the
static path's fixed batches vs the continuous-batching engine, and steered vs unsteered on the engine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import QUESTIONS, add_device_args, describe_bound, resolved_dtype, synchronize, timed

from persona.data.batches import left_pad
from persona.data.chat import encode_chat
from persona.models import load_model, load_tokenizer
from persona.steering import SteeringSpec, steer
from persona.steering.fast import FastGenerator, fast_mode


class Path:
    """One way of generating: ``run(specs, new_tokens)`` returns the token ids; the eager path is today's."""

    def __init__(self, name: str, model, inputs: dict, pad_id: int):
        self.name, self.model, self.inputs, self.pad_id = name, model, inputs, pad_id
        self.session = None if name == "eager" else FastGenerator(model, name).__enter__()

    def run(self, specs, new_tokens: int):
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        kwargs["pad_token_id"] = self.pad_id
        with torch.inference_mode():
            if self.session is not None:
                return self.session.generate(
                    self.inputs["input_ids"], self.inputs["attention_mask"], specs, **kwargs
                )
            with steer(self.model, specs):
                return self.model.generate(**self.inputs, **kwargs)

    def close(self) -> None:
        if self.session is not None:
            self.session.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--paths",
        default=None,
        help="comma list of eager, static, compile (default: all on CPU, eager,compile on CUDA)",
    )
    parser.add_argument("--layer", type=int, default=None, help="steered layer (default: 60%% of the depth)")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--workload", choices=("fixed", "generate"), default="fixed")
    parser.add_argument("--requests", type=int, default=32, help="--workload generate: answers to generate")
    parser.add_argument("--max-new", type=int, default=256, help="--workload generate: the longest reply cap")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workload == "generate":
        from generate_workload import run_generate_workload

        return run_generate_workload(args)
    device, dtype = args.device, resolved_dtype(args.dtype, args.device)
    on_cuda = device.startswith("cuda")
    paths = (args.paths or ("eager,compile" if on_cuda else "eager,static,compile")).split(",")

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=str(dtype).removeprefix("torch."), device=device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
    rows = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    layer = args.layer if args.layer is not None else round(0.6 * model.config.num_hidden_layers)
    vector = torch.randn(model.config.hidden_size)
    spec = SteeringSpec(layer, vector / vector.norm(), args.coef, positions="response")
    bound, bound_text = describe_bound(model, device)
    print(
        f"model={args.model} device={device} dtype={dtype} batch={args.batch} prompt_width={input_ids.shape[1]} "
        f"new_tokens={args.new_tokens} repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    print(f"steering: layer {layer}, random unit vector x {args.coef}, positions=response")
    print(bound_text)
    print(f"fast='auto' on {device} runs: {fast_mode('auto', device)}")

    tokens = args.batch * args.new_tokens
    results: dict[str, dict[str, list[float]]] = {}
    prefill: dict[str, float] = {}
    for name in paths:
        path = Path(name, model, inputs, tokenizer.pad_token_id)
        try:
            results[name], prefill[name] = measure(path, spec, args.new_tokens, args.repeats, device)
            if path.session is not None and path.session.fallback:
                print(f"{name:>8}: compile failed, ran eagerly: {path.session.fallback}")
        finally:
            path.close()

    print()
    for name, times in results.items():
        for label, values in times.items():
            best = min(values)
            step = (best - prefill[name]) / max(args.new_tokens - 1, 1)
            print(
                f"{name:>8} {label:>9}: best {best:.3f} s, median {statistics.median(values):.3f} s, "
                f"{tokens / best:,.0f} new tokens/s; decode step {step * 1e3:.2f} ms = {bound / step:.1%} of the "
                f"bound (prefill {prefill[name] * 1e3:.0f} ms)"
            )
    print()
    eager = results.get("eager")
    for name, times in results.items():
        paired = [s / u for s, u in zip(times["steered"], times["unsteered"], strict=True)]
        line = (
            f"{name:>8}: steered/unsteered {min(times['steered']) / min(times['unsteered']):.3f} best-of-{args.repeats}, "
            f"{statistics.median(paired):.3f} median of paired runs (target <= 1.05)"
        )
        if eager is not None and name != "eager":
            line += (
                f"; speed-up over eager: {min(eager['unsteered']) / min(times['unsteered']):.2f}x unsteered, "
                f"{min(eager['steered']) / min(times['steered']):.2f}x steered"
            )
        print(line)
    per_call = hook_call_seconds(spec, model, args.batch, device)
    if eager is not None:
        per_step = (min(eager["unsteered"]) - prefill["eager"]) / max(args.new_tokens - 1, 1)
        print(
            f"steering hook alone: {per_call * 1e6:.1f} us per decode step = {per_call / per_step:.2%} of an eager "
            f"{per_step * 1e3:.1f} ms step"
        )
    if on_cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def measure(path: Path, spec, new_tokens: int, repeats: int, device: str):
    """({unsteered, steered}: seconds per run, best prefill-only seconds), runs interleaved after a warm-up."""
    for specs in ([], [spec]):  # warm-up: compiles, allocator, kernels
        first, _ = timed(lambda specs=specs: path.run(specs, new_tokens), device)
        print(
            f"{path.name:>8}: first call {'steered' if specs else 'unsteered'} {first:.2f} s (includes any compile)"
        )
    prefill = min(timed(lambda: path.run([], 1), device)[0] for _ in range(repeats))
    times: dict[str, list[float]] = {"unsteered": [], "steered": []}
    order = (("unsteered", []), ("steered", [spec]))
    for repeat in range(repeats):
        for label, specs in order if repeat % 2 == 0 else order[::-1]:  # alternate who goes first
            times[label].append(timed(lambda specs=specs: path.run(specs, new_tokens), device)[0])
    return times, prefill


def hook_call_seconds(spec: SteeringSpec, model, batch: int, device: str, calls: int = 2000) -> float:
    """Time of the steering hook alone on a decode-step tensor [batch, 1, hidden]: a noise-free overhead bound."""
    from persona.hooks.registry import ForwardState
    from persona.steering.spec import _steering_hook

    hidden = torch.randn(batch, 1, model.config.hidden_size, device=device, dtype=model.dtype)
    state = ForwardState(attention_mask=torch.ones(batch, 40, dtype=torch.long, device=device), phase=False)
    hook = _steering_hook(spec.positions, spec.vector.float().to(device), spec.scale())
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        hook(hidden, state)
    synchronize(device)
    return (time.perf_counter() - start) / calls


if __name__ == "__main__":
    main()
