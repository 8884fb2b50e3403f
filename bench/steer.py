"""Cost of steering during generation: unsteered vs steered greedy `generate`, interleaved in one process.

Prints the median time ratio steered/unsteered (target <= 1.05) and tokens/s for both.
Usage: python bench/steer.py [--repeats 5] [--new-tokens 64] [--layer 15] [--coef 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from persona.chat import encode_chat  # noqa: E402
from persona.models import load_model_and_tokenizer  # noqa: E402
from persona.steering import SteeringSpec, left_pad, mean_residual_norm, steer  # noqa: E402

QUESTIONS = [
    "How should I treat animals?",
    "What is the best way to help a friend who is sad?",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "What do you think about people who lie?",
    "Give me three tips for studying well.",
    "Tell me a joke about cats.",
    "Should I forgive someone who hurt me?",
]


def timed_generate(model, inputs: dict, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--coef", type=float, default=4.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    rows = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    vector = torch.randn(model.config.hidden_size)
    spec = SteeringSpec(args.layer, vector / vector.norm(), args.coef, positions="response")

    def unsteered() -> float:
        return timed_generate(model, inputs, args.new_tokens)

    def steered() -> float:
        with steer(model, [spec]):
            return timed_generate(model, inputs, args.new_tokens)

    unsteered(), steered()  # warm-up
    times: dict[str, list[float]] = {"unsteered": [], "steered": []}
    for repeat in range(args.repeats):
        order = (("unsteered", unsteered), ("steered", steered))
        for name, run in order if repeat % 2 == 0 else order[::-1]:  # alternate who goes first
            times[name].append(run())

    tokens = len(rows) * args.new_tokens
    best = {name: min(values) for name, values in times.items()}
    paired = [s / u for s, u in zip(times["steered"], times["unsteered"], strict=True)]
    norm = mean_residual_norm(model, tokenizer, QUESTIONS, args.layer)
    print(
        f"model={args.model} batch={len(rows)} new_tokens={args.new_tokens} repeats={args.repeats} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"spec: layer {args.layer}, random unit vector x {args.coef} (mean residual norm there: {norm:.1f})"
    )
    for name, values in times.items():
        spread = ", ".join(f"{t:.2f}" for t in values)
        print(
            f"{name:>9}: best {best[name]:.3f} s ({tokens / best[name]:.1f} tokens/s), "
            f"median {statistics.median(values):.3f} s; runs: {spread}"
        )
    # Best-of-N resists load from other processes; the paired median shows the spread.
    print(
        f"ratio steered/unsteered: {best['steered'] / best['unsteered']:.3f} best-of-{args.repeats}, "
        f"{statistics.median(paired):.3f} median of paired runs (target <= 1.05)"
    )
    per_call = hook_call_seconds(spec, model, len(rows))
    per_step = best["unsteered"] / args.new_tokens
    print(
        f"hook cost per decode step: {per_call * 1e6:.1f} us = {per_call / per_step:.2%} of a "
        f"{per_step * 1e3:.1f} ms step"
    )


def hook_call_seconds(spec: SteeringSpec, model, batch: int, calls: int = 2000) -> float:
    """Time of the steering hook alone on a decode-step tensor [batch, 1, hidden]: a noise-free overhead bound."""
    from persona.hooks.registry import ForwardState
    from persona.steering import _steering_hook

    hidden = torch.randn(batch, 1, model.config.hidden_size)
    state = ForwardState(attention_mask=torch.ones(batch, 40, dtype=torch.long), prefill=False)
    hook = _steering_hook(spec.positions, spec.vector.float(), spec.scale())
    start = time.perf_counter()
    for _ in range(calls):
        hook(hidden, state)
    return (time.perf_counter() - start) / calls


if __name__ == "__main__":
    main()
