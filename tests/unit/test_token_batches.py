"""Batching by tokens (``--max_batch_tokens``): same results as batching by rows, no batch over the budget."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch
from torch.utils.data import SequentialSampler

from conftest import NEGATIVE, POSITIVE, QUESTIONS
from persona.commands.extract import extract
from persona.commands.project import project
from persona.data.batches import TokenBudgetBatchSampler
from persona.data.examples import Example
from persona.data.modules import ExampleDataModule
from persona.errors import PersonaError
from persona.vectors import VECTOR_KINDS, load_vector, save_vector


def padded_size(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


@pytest.mark.parametrize("budget", [1, 7, 40, 97, 10_000])
def test_batches_cover_every_item_once_in_order_within_the_budget(budget):
    rng = random.Random(budget)
    lengths = sorted((rng.randint(1, 60) for _ in range(50)), reverse=True)
    batches = list(TokenBudgetBatchSampler(SequentialSampler(lengths), budget, lengths))
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    for batch in batches:
        assert padded_size(batch, lengths) <= budget or len(batch) == 1  # an over-long item runs alone
    for first, second in zip(batches, batches[1:], strict=False):  # greedy: the next item did not fit
        assert padded_size([*first, second[0]], lengths) > budget
    assert len(TokenBudgetBatchSampler(SequentialSampler(lengths), budget, lengths)) == len(batches)


def test_an_example_longer_than_the_budget_forms_its_own_batch():
    lengths = [30, 9, 8, 2]
    assert list(TokenBudgetBatchSampler(range(4), 20, lengths)) == [[0], [1, 2], [3]]


def examples() -> list[Example]:
    rows = []
    for i, question in enumerate(QUESTIONS):
        for label, answers in ((1, POSITIVE), (0, NEGATIVE)):
            prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            rows.append(Example(prompt, answers[i] * (1 + i % 3), label, f"{label}-{i}"))
    return rows


def test_the_datamodule_keeps_batches_sorted_and_within_the_budget(tokenizer):
    lengths = [
        len(tokenizer(e.prompt + e.response, add_special_tokens=False)["input_ids"]) for e in examples()
    ]
    budget = 2 * max(lengths) + 1  # the longest example shares its batch with one more
    module = ExampleDataModule(examples(), tokenizer, batch_size=1, max_batch_tokens=budget)
    module.setup("predict")
    batches = list(module.predict_dataloader())
    widths = [batch["input_ids"].shape[1] for batch in batches]
    assert widths == sorted(widths, reverse=True)
    assert all(b["input_ids"].numel() <= budget for b in batches)
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(len(examples())))
    assert len(batches) < len(examples())  # several rows per batch: not the batch_size of 1
    with pytest.raises(ValueError, match="max_batch_tokens=0"):
        ExampleDataModule(examples(), tokenizer, max_batch_tokens=0)


def write_pairs(path):
    import json

    with path.open("w") as handle:
        for i, question in enumerate(QUESTIONS):
            handle.write(
                json.dumps({"prompt": question, "positive": POSITIVE[i], "negative": NEGATIVE[i]}) + "\n"
            )
    return path


def test_extract_by_tokens_equals_extract_by_rows(tiny_model_dirs, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    common = {
        "model": tiny_model_dirs["qwen2"],
        "pairs_path": str(pairs),
        "trait": "evil",
        "accelerator": "cpu",
    }
    rows = extract(save_dir=str(tmp_path / "rows"), batch_size=1, **common)
    tokens = extract(save_dir=str(tmp_path / "tokens"), max_batch_tokens=120, **common)  # 1-3 rows a batch
    for kind in VECTOR_KINDS:
        torch.testing.assert_close(load_vector(tokens[kind]), load_vector(rows[kind]), rtol=1e-5, atol=1e-6)
    with pytest.raises(PersonaError, match="--max_batch_tokens 0"):
        extract(save_dir=str(tmp_path / "bad"), max_batch_tokens=0, **common)


def write_scored_csv(path):
    rows = [{"prompt": example.prompt, "answer": example.response} for example in examples()]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_project_by_tokens_equals_project_by_rows(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["gpt2"]
    vector = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    vector_path = save_vector(vector, tmp_path / "evil_response_avg_diff.pt")
    frames = []
    for name, batching in (("rows", {"batch_size": 3}), ("tokens", {"max_batch_tokens": 150})):
        path = write_scored_csv(tmp_path / f"{name}.csv")
        project(
            file_path=str(path),
            vector_path=str(vector_path),
            layer=[1, 3],
            model=model_dir,
            accelerator="cpu",
            **batching,
        )
        frames.append(pd.read_csv(path))
    pd.testing.assert_frame_equal(frames[1], frames[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_spawn_two_processes_by_tokens_equals_one(tiny_model_dirs, tmp_path):
    """Lightning hands each rank its share through the batch sampler's ``sampler`` argument."""
    model_dir = tiny_model_dirs["llama"]
    vector_path = save_vector(torch.randn(4, 32), tmp_path / "evil_response_avg_diff.pt")
    frames = []
    for name, extra in (("one", {}), ("two", {"devices": 2, "strategy": "ddp_spawn"})):
        path = write_scored_csv(tmp_path / f"{name}.csv")
        project(
            file_path=str(path),
            vector_path=str(vector_path),
            layer=[2],
            model=model_dir,
            max_batch_tokens=150,
            accelerator="cpu",
            **extra,
        )
        frames.append(pd.read_csv(path))
    pd.testing.assert_frame_equal(frames[1], frames[0], rtol=1e-5, atol=1e-6)
