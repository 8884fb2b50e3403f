"""LoRA training step with logits everywhere (the model's own ``labels`` loss) vs logits only where a label needs
them (``causal_lm_loss``), one process, the same batches: seconds per step and the logits' size.

    python bench/finetune_loss.py [--samples 24] [--batch_size 4] [--repeats 3] [--device cuda] [--model M]

The data is the fine-tuning study's: chat mixtures of the evil pairs (prompts with short answers, as the demo).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import add_device_args, resolved_dtype, timed

from persona.data.build import dataset
from persona.training import ChatDataModule, LoRAFineTune
from persona.training.losses import causal_lm_loss


def step_seconds(module: LoRAFineTune, batches: list[dict], keep_logits: bool, device: str) -> float:
    def run():
        for batch in batches:
            module.model.zero_grad()
            loss = causal_lm_loss(module.model, batch) if keep_logits else module.model(**batch).loss
            loss.backward()

    return timed(run, device)[0] / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_device_args(parser)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset(trait="evil", output_dir=tmp, mix=[0.5], n=args.samples, split="train", overwrite=True)
        data = ChatDataModule(train_files=[str(Path(tmp) / "mix_0.5.jsonl")], val_fraction=0.0, model=args.model,
                              batch_size=args.batch_size, max_length=160)  # fmt: skip
        data.setup("fit")
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in data.train_dataloader()]
    dtype = str(resolved_dtype(args.dtype, args.device)).removeprefix("torch.")
    module = LoRAFineTune(model=args.model, dtype=dtype, r=8, lora_alpha=16, warmup_steps=0)
    module.configure_model()
    module.model.to(args.device).eval()  # no dropout: both ways see the same computation
    step_seconds(module, batches[:1], True, args.device)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
        for keep in (False, True):
            times[keep].append(step_seconds(module, batches, keep, args.device))
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    full, kept = min(times[False]), min(times[True])
    print(f"{len(batches)} batches of {args.batch_size}: {tokens} tokens, {labelled} labelled")
    print(f"logits everywhere:      {full * 1e3:8.1f} ms/step")
    print(f"logits where labelled:  {kept * 1e3:8.1f} ms/step   ratio {full / kept:.2f}x")


if __name__ == "__main__":
    main()
