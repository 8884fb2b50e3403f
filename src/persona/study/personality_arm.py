"""The study's personality arm, in the spirit of the second seed: LoRA on a personality trait's high-trait answers
(TRAIT items, train split), then the trait's vector quality in the base and the fine-tuned model on the held-out
items — AUC range, separation range and the layers that encode it — and the representation shift between them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from persona.core.store import write_csv


def personality_arm_phase(phase_dir: Path, *, model: str, trait: str, sizes, hardware) -> dict:
    from persona.analysis.representation_shift import (
        plot_representation_shift,
        representation_shift,
        summarise,
        vector_quality,
    )
    from persona.commands.extract import extract
    from persona.commands.flags import Hardware
    from persona.commands.layers import layers
    from persona.data.build import dataset
    from persona.data.personality import resolve_items_path
    from persona.data.traits import load_trait
    from persona.study.finetune import train_run
    from persona.vectors import load_vector

    name, items = resolve_items_path(trait)
    read = dict(pairs_path=str(items), overwrite=True,
                hardware=Hardware(accelerator=hardware.accelerator, dtype=hardware.dtype))  # fmt: skip
    data = dataset(trait=name, pairs_path=str(items), output_dir=str(phase_dir / "data"), mix=[1.0],
                   n=sizes.finetune_samples, split="train", overwrite=True)  # fmt: skip
    base_vector = extract(model=model, trait=name, split="train", save_dir=str(phase_dir / "base"), **read)
    base_layer = layers(vector_path=base_vector["response_avg"], model=model, split="test",
                        output_dir=str(phase_dir / "base"), **read)  # fmt: skip
    tuned = train_run(
        phase_dir, f"high_{name}", Path(data["mix_1.jsonl"]), model=model, vector_path=base_vector["response_avg"],
        layer=base_layer, eval_file=load_trait(name, "eval").path, epochs=sizes.finetune_epochs,
        extra_callbacks=[], hardware=hardware,
    )  # fmt: skip
    tuned_vector = extract(
        model=tuned["adapter"], trait=name, split="train", save_dir=str(phase_dir / "tuned"), **read
    )
    layers(vector_path=tuned_vector["response_avg"], model=tuned["adapter"], split="test",
           output_dir=str(phase_dir / "tuned"), **read)  # fmt: skip
    # The base model's metrics on the same held-out items are already in base/: no second pass over them.
    table = representation_shift(
        load_vector(base_vector["response_avg"]).numpy(), load_vector(tuned_vector["response_avg"]).numpy(),
        pd.read_csv(phase_dir / "base" / "layer_metrics.csv"), pd.read_csv(phase_dir / "tuned" / "layer_metrics.csv"),
    )  # fmt: skip
    write_csv(phase_dir / "tuned" / "representation_shift.csv", table)
    plot_representation_shift(table, summarise(table), phase_dir / "tuned" / "representation_shift.png",
                              title=f"{name}: base vs fine-tuned on high-{name} answers")  # fmt: skip
    quality = vector_quality(table)
    write_csv(phase_dir / "vector_quality.csv", quality)
    return {
        "trait": name,
        "conversations": len(Path(data["mix_1.jsonl"]).read_text(encoding="utf-8").splitlines()),
        "adapter": tuned["adapter"],
        "quality": quality.to_dict("records"),
        "csv": str(phase_dir / "vector_quality.csv"),
        "shift_csv": str(phase_dir / "tuned" / "representation_shift.csv"),
        "png": str(phase_dir / "tuned" / "representation_shift.png"),
    }
