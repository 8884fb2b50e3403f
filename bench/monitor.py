"""ActivationMonitor overhead: LoRA epochs with and without the monitor, one process, where the user runs.

The monitor measures once before training and once per epoch over the trait's 20 eval questions
(last prompt token), so its cost is per epoch, not per step. Target: <= 10 % of a plain epoch.

    python bench/monitor.py [--samples 32] [--epochs 2] [--device cuda] [--dtype bfloat16] [--model M]

The vector is the shipped evil vector for the embedded model, and a random one of the right shape otherwise.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import add_device_args, resolved_dtype, synchronize

from persona.data.build import dataset
from persona.models import DEFAULT_MODEL, model_dimensions
from persona.training import ChatDataModule, LoRAFineTune
from persona.training.monitor import ActivationMonitor
from persona.vectors import save_vector

ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "persona_vectors" / "smollm2-135m" / "evil_response_avg_diff.pt"
EVAL = ROOT / "datasets" / "traits" / "eval" / "evil.json"


def fit_seconds(
    train_file: Path, root: Path, epochs: int, monitored: bool, args, vector: Path, layer: int
) -> float:
    L.seed_everything(0, verbose=False)
    dtype = str(resolved_dtype(args.dtype, args.device)).removeprefix("torch.")
    module = LoRAFineTune(
        model=args.model,
        dtype=dtype,
        r=8,
        lora_alpha=16,
        learning_rate=1e-3,
        warmup_steps=0,
        adapter_dir=str(root / "adapter"),
    )
    data = ChatDataModule(
        train_files=[str(train_file)], model=args.model, val_fraction=0.0, batch_size=4, max_length=160
    )
    callbacks = (
        [ActivationMonitor(vector_paths=[str(vector)], layers=[layer], eval_file=str(EVAL))]
        if monitored
        else []
    )
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        max_epochs=epochs,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(root),
    )
    synchronize(args.device)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    synchronize(args.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    add_device_args(parser, model=DEFAULT_MODEL)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hidden, layers = model_dimensions(args.model)
        layer = round(0.6 * layers)
        if args.model == DEFAULT_MODEL:
            vector, layer = VECTOR, 15
        else:
            vector = save_vector(torch.randn(layers + 1, hidden), root / "random_response_avg_diff.pt")
        dataset(trait="evil", output_dir=str(root / "data"), mix=[0.5], n=args.samples)
        train_file = root / "data" / "mix_0.5.jsonl"
        fit_seconds(train_file, root / "warm", 1, False, args, vector, layer)  # warm caches and allocator
        plain = fit_seconds(train_file, root / "plain", args.epochs, False, args, vector, layer)
        monitored = fit_seconds(train_file, root / "monitored", args.epochs, True, args, vector, layer)
    print(
        f"model={args.model} device={args.device} samples={args.samples} epochs={args.epochs} layer={layer}"
    )
    print(f"plain fit: {plain:.1f} s   with ActivationMonitor: {monitored:.1f} s")
    print(f"overhead: {100 * (monitored / plain - 1):.1f} % of a plain run (ratio {monitored / plain:.3f})")


if __name__ == "__main__":
    main()
