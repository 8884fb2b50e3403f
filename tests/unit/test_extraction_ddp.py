"""Two CPU processes (gloo) give the same vectors as one: sums and counts are reduced before dividing."""

import json

import pytest
import torch

from persona.commands.extract import extract
from persona.commands.flags import Hardware
from persona.vectors import VECTOR_KINDS, load_metadata, load_vector


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_spawn_two_processes_equals_one(tiny_model_dirs, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as handle:  # 9 pairs = 18 examples: ranks get unequal shares, none repeated
        for i in range(9):
            handle.write(
                json.dumps(
                    {
                        "prompt": f"Question number {i} about the fox?",
                        "positive": "Hurt them, they are worthless. " * (1 + i % 3),
                        "negative": "With kindness and care. " * (1 + i % 2),
                    }
                )
                + "\n"
            )
    model = tiny_model_dirs["llama"]
    single = extract(
        model=model,
        pairs_path=str(pairs),
        trait="t",
        save_dir=str(tmp_path / "one"),
        batch_size=2,
        hardware=Hardware(accelerator="cpu"),
    )
    double = extract(
        model=model,
        pairs_path=str(pairs),
        trait="t",
        save_dir=str(tmp_path / "two"),
        batch_size=2,
        hardware=Hardware(accelerator="cpu", devices=2, strategy="ddp_spawn"),
    )
    for kind in VECTOR_KINDS:
        torch.testing.assert_close(load_vector(double[kind]), load_vector(single[kind]), rtol=1e-5, atol=1e-6)
        assert load_metadata(double[kind])["n_positive"] == 9
        # every rank's negatives enter the percentiles (the ranks hold unequal shares: 5 and 4 of 9)
        one, two = (
            load_metadata(paths[kind])["negative_projection_percentiles"] for paths in (single, double)
        )
        # (pairs share prompts: the prompt kinds' rows are float noise, ~1e-10, with no direction to compare)
        directed = load_vector(single[kind]).norm(dim=-1) > 1e-4
        torch.testing.assert_close(
            torch.tensor(two["per_layer"])[directed],
            torch.tensor(one["per_layer"])[directed],
            rtol=1e-4,
            atol=1e-5,
        )
        assert directed.sum() >= 3 or kind != "response_avg"
