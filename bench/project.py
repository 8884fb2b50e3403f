"""Projection speed: the seed's cal_projection way vs `persona project`, same data and model, one process.

The seed runs one example at a time with output_hidden_states=True (every block, the final norm and
the LM head). Ours is the Lightning predict loop: batched, hooks, blocks up to the layer only, timed as the whole
`persona project` command (model load included) and as the loop alone on the already-loaded model. Prints the
speed ratios and the max absolute difference of the scores.

    python bench/project.py [--samples 64] [--layer 15] [--batch_size 8 | --max_batch_tokens 16384]
                            [--device cuda] [--dtype bfloat16] [--model M]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch
from common import add_device_args, resolved_dtype, timed

from persona.commands.flags import Batching, Hardware
from persona.commands.project import project
from persona.data.modules import ExampleDataModule
from persona.data.scored_files import projection_column, read_scored_file, scored_file_examples
from persona.models import DEFAULT_MODEL, load_model, load_tokenizer
from persona.vectors import save_vector
from persona.vectors.projection import ExampleProjector, predict_projections

ROOT = Path(__file__).resolve().parents[1]


def build_csv(tokenizer, samples: int, path: Path) -> int:
    """Rows (chat-formatted prompt, answer) from the evil pairs: both answers of each pair."""
    pairs = [
        json.loads(line) for line in (ROOT / "datasets/pairs/evil.jsonl").read_text().splitlines() if line
    ]
    rows, tokens = [], 0
    for i in range(samples):
        pair = pairs[(i // 2) % len(pairs)]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": pair["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        answer = pair["positive" if i % 2 == 0 else "negative"]
        rows.append({"prompt": prompt, "answer": answer})
        tokens += len(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
    pd.DataFrame(rows).to_csv(path, index=False)
    return tokens


def seed_method(model, tokenizer, path: Path, vector: torch.Tensor, layer: int, device: str) -> list[float]:
    """As cal_projection: prompt + answer tokenised together, all hidden states, response mean on the unit vector."""
    frame = pd.read_csv(path)
    direction = vector[layer].to(device)
    scores = []
    for prompt, answer in zip(frame["prompt"], frame["answer"], strict=True):
        inputs = tokenizer(prompt + answer, return_tensors="pt", add_special_tokens=False).to(device)
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        with torch.no_grad():  # the seed builds the autograd graph too; leaving it out favours the seed
            outputs = model(**inputs, output_hidden_states=True)
        response_avg = outputs.hidden_states[layer][:, prompt_len:].float().mean(dim=1)
        scores.append(float((response_avg * direction).sum(dim=-1) / direction.norm()))
    return scores


def ours_loop(model, tokenizer, args, path: Path, vector: torch.Tensor) -> list[float]:
    """The predict loop of `persona project` on an already-loaded model."""
    examples = scored_file_examples(path, read_scored_file(path), tokenizer)
    projector = ExampleProjector(layers=[args.layer], directions=vector[args.layer][None], module=model)
    datamodule = ExampleDataModule(
        examples, tokenizer, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens
    )
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    scores = predict_projections(projector, datamodule, len(examples), accelerator=accelerator)
    return scores["response_avg"][:, 0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    add_device_args(parser, model=DEFAULT_MODEL)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_batch_tokens", type=int, default=None)
    args = parser.parse_args()
    dtype = resolved_dtype(args.dtype, args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, device=args.device)
    config = model.config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        tokens = build_csv(tokenizer, args.samples, path)
        generator = torch.Generator().manual_seed(0)
        vector = torch.randn(config.num_hidden_layers + 1, config.hidden_size, generator=generator)
        vector_path = save_vector(vector, Path(tmp) / "random_response_avg_diff.pt")

        seed_seconds, seed = timed(
            lambda: seed_method(model, tokenizer, path, vector, args.layer, args.device), args.device
        )
        ours_seconds, _ = timed(  # ours includes loading the model and tokenizer: the whole command
            lambda: project(
                file_path=str(path),
                vector_path=str(vector_path),
                layer=args.layer,
                model=args.model,
                batch_size=args.batch_size,
                hardware=Hardware(
                    dtype=str(dtype).removeprefix("torch."),
                    accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                ),
                batching=Batching(max_batch_tokens=args.max_batch_tokens),
            ),
            args.device,
        )
        ours = pd.read_csv(path)[projection_column(args.model, vector_path, "proj", args.layer)].tolist()
        loop_tokenizer = load_tokenizer(args.model, padding_side="right")
        loop_seconds, loop = timed(lambda: ours_loop(model, loop_tokenizer, args, path, vector), args.device)
    worst = max(abs(a - b) for a, b in zip(ours + loop, seed + seed, strict=True))
    scale = max(abs(b) for b in seed)
    print(
        f"samples={args.samples} tokens={tokens} layer={args.layer}/{config.num_hidden_layers} "
        f"batch_size={args.batch_size} threads={torch.get_num_threads()}"
    )
    print(f"device={args.device} dtype={dtype}")
    print(
        f"seed method: {seed_seconds:.1f} s   persona project: {ours_seconds:.1f} s whole command incl. model load, "
        f"{loop_seconds:.1f} s predict loop on the loaded model ({tokens / loop_seconds:.0f} tokens/s)"
    )
    print(
        f"speed ratio (seed / ours): {seed_seconds / ours_seconds:.2f}x whole command, "
        f"{seed_seconds / loop_seconds:.2f}x loop alone"
    )
    print(f"max abs difference of scores: {worst:.2e} (largest |score| {scale:.2f})")


if __name__ == "__main__":
    main()
