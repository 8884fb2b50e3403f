"""Batching by tokens (``--max_batch_tokens``): same results as batching by rows, no batch over the budget;
either way no batch padded far past its rows (a row far longer than the rest runs alone)."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch
from torch.utils.data import SequentialSampler

from conftest import NEGATIVE, POSITIVE, QUESTIONS
from persona.commands.extract import extract
from persona.commands.flags import Batching, Hardware
from persona.commands.project import project
from persona.core.errors import PersonaError
from persona.data.batches import PADDING_SLACK, LengthBatchSampler
from persona.data.examples import Example
from persona.data.modules import ExampleDataModule
from persona.vectors import VECTOR_KINDS, load_vector, save_vector


def padded_size(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


@pytest.mark.parametrize("budget", [1, 7, 40, 97, 10_000])
def test_batches_cover_every_item_once_in_order_within_the_budget(budget):
    rng = random.Random(budget)
    lengths = sorted((rng.randint(1, 60) for _ in range(50)), reverse=True)
    batches = list(LengthBatchSampler(SequentialSampler(lengths), lengths, max_batch_tokens=budget))
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    for batch in batches:
        assert padded_size(batch, lengths) <= budget or len(batch) == 1  # an over-long item runs alone
    for first, second in zip(batches, batches[1:], strict=False):  # greedy: the next item did not fit
        grown = [*first, second[0]]
        shortest = min(lengths[i] for i in grown)
        assert (
            padded_size(grown, lengths) > budget or max(lengths[i] for i in grown) > PADDING_SLACK * shortest
        )
    assert len(LengthBatchSampler(SequentialSampler(lengths), lengths, max_batch_tokens=budget)) == len(
        batches
    )


def test_an_example_longer_than_the_budget_forms_its_own_batch():
    lengths = [30, 9, 8, 2]
    assert list(LengthBatchSampler(range(4), lengths, max_batch_tokens=20)) == [[0], [1, 2], [3]]


@pytest.mark.parametrize("rows", [2, 4, 8])
def test_a_row_far_longer_than_the_rest_runs_alone_and_no_batch_pads_past_its_rows(rows):
    """Issue 20.1: one 100k-character answer padded every row of its batch to its length (10.6 GB asked for)."""
    rng = random.Random(rows)
    lengths = [25_000, *sorted((rng.randint(20, 60) for _ in range(30)), reverse=True)]
    batches = list(LengthBatchSampler(range(len(lengths)), lengths, batch_size=rows))
    assert batches[0] == [0]
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= rows
        assert max(lengths[i] for i in batch) <= PADDING_SLACK * min(lengths[i] for i in batch)


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
        "hardware": Hardware(accelerator="cpu"),
    }
    rows = extract(save_dir=str(tmp_path / "rows"), batch_size=1, **common)
    tokens = extract(
        save_dir=str(tmp_path / "tokens"), **common, batching=Batching(max_batch_tokens=120)
    )  # 1-3 rows a batch
    for kind in VECTOR_KINDS:
        torch.testing.assert_close(load_vector(tokens[kind]), load_vector(rows[kind]), rtol=1e-5, atol=1e-6)
    with pytest.raises(PersonaError, match="--max_batch_tokens 0"):
        extract(save_dir=str(tmp_path / "bad"), **common, batching=Batching(max_batch_tokens=0))


def write_scored_csv(path):
    rows = [{"prompt": example.prompt, "answer": example.response} for example in examples()]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_project_by_tokens_equals_project_by_rows(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["gpt2"]
    vector = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    vector_path = save_vector(vector, tmp_path / "evil_response_avg_diff.pt")
    frames = []
    for name, batching in (
        ("rows", {"batch_size": 3}),
        ("tokens", {"batching": Batching(max_batch_tokens=150)}),
    ):
        path = write_scored_csv(tmp_path / f"{name}.csv")
        project(
            file_path=str(path),
            vector_path=str(vector_path),
            layer=[1, 3],
            model=model_dir,
            hardware=Hardware(accelerator="cpu"),
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
            hardware=Hardware(accelerator="cpu", **extra),
            batching=Batching(max_batch_tokens=150),
        )
        frames.append(pd.read_csv(path))
    pd.testing.assert_frame_equal(frames[1], frames[0], rtol=1e-5, atol=1e-6)


def test_the_context_comes_from_the_config_when_the_tokenizer_holds_the_placeholder(
    tokenizer, tiny_model_dirs
):
    """Issue 20.1: SmolLM2's tokenizer says model_max_length=1e30, so nothing was ever cut."""
    from transformers import AutoConfig, AutoTokenizer

    from persona.models import context_length

    saved = AutoTokenizer.from_pretrained(tiny_model_dirs["gpt2"])
    assert saved.model_max_length > 10**20  # transformers' "no limit" placeholder
    assert context_length(saved) == 256  # n_positions of the config saved beside it
    assert context_length(tokenizer) is None  # an in-memory tokenizer with no config: nothing to tell
    config = AutoConfig.from_pretrained(tiny_model_dirs["llama"])
    assert context_length(tokenizer, config) == 256
    saved.model_max_length = 100  # a declared limit below the positions wins
    assert context_length(saved) == 100


def test_project_cuts_a_100k_character_answer_to_the_context_and_counts_it(tiny_model_dirs, tmp_path, caplog):
    """Issue 20.1: the long row went uncut (past gpt2's 256 positions) and padded its whole batch."""
    rows = [{"prompt": example.prompt, "answer": example.response} for example in examples()[:3]]
    rows.append({"prompt": rows[0]["prompt"], "answer": "kind words " * 10_000})
    path = tmp_path / "long.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    vector_path = save_vector(torch.randn(4, 32), tmp_path / "evil_response_avg_diff.pt")
    with caplog.at_level("WARNING", logger="persona.data.batches"):
        project(
            file_path=str(path), vector_path=str(vector_path), layer=[2], model=tiny_model_dirs["gpt2"],
            batch_size=4, hardware=Hardware(accelerator="cpu"),
        )  # fmt: skip
    written = pd.read_csv(path)
    column = next(name for name in written.columns if name.endswith("evil_response_avg_diff_proj_layer2"))
    assert written[column].notna().all()
    cut = [r.getMessage() for r in caplog.records if "longer than max_length" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("1 of 4 examples") and "max_length=256" in cut[0], cut
