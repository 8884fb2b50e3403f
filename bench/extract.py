"""Extraction speed: the seed's method vs `persona extract`, same data and model, one process.

The seed runs one example at a time with output_hidden_states=True and full logits. Ours is the
Lightning predict loop (batched, hooks, no LM head), timed twice: the whole `persona extract` command (model
load included) and the loop alone on the model the seed's method used. Prints the speed ratios and the max
relative difference of the vectors (rows 0..N-1: the seed's last row is taken after the final norm, ours before).

    python bench/extract.py [--samples 64] [--batch_size 8 | --max_batch_tokens 16384] [--device cuda]
                            [--dtype bfloat16] [--model M]

Targets: ours >= 3x the seed's method on the same device; vectors equal to 1e-5 relative in float32,
1e-3 in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch
from common import add_device_args, resolved_dtype, timed

from persona.commands.extract import extract
from persona.commands.flags import Batching, Hardware
from persona.core.hardware import make_trainer
from persona.data.modules import ResponseDataModule
from persona.models import load_model, load_tokenizer
from persona.vectors import VECTOR_KINDS, load_vector
from persona.vectors.extraction import VectorExtractor

ROOT = Path(__file__).resolve().parents[1]


def build_csvs(tokenizer, samples: int, out_dir: Path) -> tuple[Path, Path, int]:
    """Seed-shaped pos/neg CSVs: persona system prompts, trait questions, several answers per question."""
    trait = json.loads((ROOT / "datasets/traits/extract/evil.json").read_text())
    items = json.loads((ROOT / "datasets/personality/psychopathy.json").read_text())
    per_question = 8
    frames, tokens = {}, 0
    for label, side, name in ((1, "pos", "evil"), (0, "neg", "helpful")):
        rows = []
        for i in range(samples // 2):
            question = trait["questions"][(i // per_question) % len(trait["questions"])]
            system = f"You are {'an' if name[0] in 'aeiou' else 'a'} {name} assistant. {trait['instruction'][0][side]}"
            prompt = tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": question}],
                tokenize=False,
                add_generation_prompt=True,
            )
            key = "response_high" if label else "response_low"
            answer = " ".join(items[(i + j) % len(items)][f"{key}{1 + j % 2}"] for j in range(3))
            rows.append(
                {
                    "question": question,
                    "prompt": prompt,
                    "answer": answer,
                    "question_id": f"q{i}",
                    "evil": 90 if label else 5,
                    "coherence": 90,
                }
            )
            tokens += len(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
        frames[side] = pd.DataFrame(rows)
    pos, neg = out_dir / "pos.csv", out_dir / "neg.csv"
    frames["pos"].to_csv(pos, index=False)
    frames["neg"].to_csv(neg, index=False)
    return pos, neg, tokens


def seed_method(model, tokenizer, pos: Path, neg: Path, device: str) -> dict[str, torch.Tensor]:
    layers = model.config.num_hidden_layers + 1
    means = {}
    for side, path in (("pos", pos), ("neg", neg)):
        frame = pd.read_csv(path)
        store = {kind: [[] for _ in range(layers)] for kind in VECTOR_KINDS}
        for prompt, answer in zip(frame["prompt"], frame["answer"], strict=True):
            inputs = tokenizer(prompt + answer, return_tensors="pt", add_special_tokens=False).to(device)
            prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
            with torch.no_grad():
                outputs = model(**inputs, output_hidden_states=True)
            for layer in range(layers):
                states = outputs.hidden_states[layer].float()
                store["prompt_avg"][layer].append(states[:, :prompt_len].mean(dim=1).detach().cpu())
                store["response_avg"][layer].append(states[:, prompt_len:].mean(dim=1).detach().cpu())
                store["prompt_last"][layer].append(states[:, prompt_len - 1].detach().cpu())
        means[side] = {
            kind: torch.stack([torch.cat(rows).mean(0) for rows in store[kind]]) for kind in VECTOR_KINDS
        }
    return {kind: means["pos"][kind] - means["neg"][kind] for kind in VECTOR_KINDS}


def ours_loop(model, args, pos: Path, neg: Path, save_dir: Path) -> dict[str, torch.Tensor]:
    """The predict loop of `persona extract` on an already-loaded model."""
    datamodule = ResponseDataModule(
        model=args.model,
        pos_path=str(pos),
        neg_path=str(neg),
        trait="evil",
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
    )
    extractor = VectorExtractor(model=args.model, trait="evil", save_dir=str(save_dir), module=model)
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    make_trainer(accelerator, 1).predict(extractor, datamodule=datamodule, return_predictions=False)
    return extractor.vectors


def main() -> None:
    parser = argparse.ArgumentParser()
    add_device_args(parser)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_batch_tokens", type=int, default=None)
    args = parser.parse_args()
    dtype = resolved_dtype(args.dtype, args.device)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        pos, neg, tokens = build_csvs(tokenizer, args.samples, Path(tmp))
        model = load_model(args.model, dtype=dtype, device=args.device)
        seed_seconds, seed = timed(lambda: seed_method(model, tokenizer, pos, neg, args.device), args.device)
        ours_seconds, paths = timed(  # ours includes loading the model and tokenizer: the whole command
            lambda: extract(
                model=args.model,
                pos_path=str(pos),
                neg_path=str(neg),
                trait="evil",
                save_dir=str(Path(tmp) / "v"),
                batch_size=args.batch_size,
                hardware=Hardware(
                    dtype=str(dtype).removeprefix("torch."),
                    accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                ),
                batching=Batching(max_batch_tokens=args.max_batch_tokens),
            ),
            args.device,
        )
        loop_seconds, loop = timed(lambda: ours_loop(model, args, pos, neg, Path(tmp) / "loop"), args.device)
        worst = 0.0
        for kind in VECTOR_KINDS:
            reference = seed[kind][:-1]
            for ours in (load_vector(paths[kind])[:-1], loop[kind][:-1]):
                relative = (ours - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)
                worst = max(worst, float(relative.max()))
    target = 1e-3 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    print(
        f"device={args.device} dtype={dtype} samples={args.samples} tokens={tokens} threads={torch.get_num_threads()}"
    )
    batching = (
        f"max_batch_tokens={args.max_batch_tokens}"
        if args.max_batch_tokens
        else f"batch_size={args.batch_size}"
    )
    print(
        f"seed method: {seed_seconds:.1f} s ({tokens / seed_seconds:.0f} tokens/s)   persona extract ({batching}): "
        f"{ours_seconds:.1f} s whole command incl. model load, {loop_seconds:.1f} s predict loop on the loaded "
        f"model ({tokens / loop_seconds:.0f} tokens/s)"
    )
    print(
        f"speed ratio (seed / ours): {seed_seconds / ours_seconds:.2f}x whole command, "
        f"{seed_seconds / loop_seconds:.2f}x loop alone (target >= 3x)"
    )
    print(
        f"max relative difference of vectors (per-layer L2, rows 0..N-1): {worst:.2e} (target <= {target:.0e})"
    )


if __name__ == "__main__":
    main()
