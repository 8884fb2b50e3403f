"""Extraction equals an independent per-example computation from HF output_hidden_states."""

import json

import pandas as pd
import pytest
import torch

from conftest import ARCHITECTURES, NEGATIVE, POSITIVE, QUESTIONS, hidden_states_without_final_norm
from persona.commands.extract import extract
from persona.commands.flags import Hardware
from persona.data.examples import Example
from persona.models import load_model, load_tokenizer
from persona.vectors import VECTOR_KINDS, load_metadata, load_vector


def write_csvs(tmp_path, tokenizer, trait="evil"):
    def rows(answers, score):
        out = []
        for i, (question, answer) in enumerate(zip(QUESTIONS, answers, strict=True)):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            out.append(
                {
                    "question": question,
                    "prompt": prompt,
                    "answer": answer,
                    "question_id": f"q{i}",
                    trait: score[i],
                    "coherence": 90,
                }
            )
        return pd.DataFrame(out)

    pos = rows(POSITIVE, [90, 80, 95, 70, 20])  # last pair fails the positive threshold
    neg = rows(NEGATIVE, [5, 10, 0, 30, 0])
    pos.to_csv(tmp_path / "pos.csv", index=False)
    neg.to_csv(tmp_path / "neg.csv", index=False)
    return tmp_path / "pos.csv", tmp_path / "neg.csv"


def reference_vectors(model, arch, tokenizer, examples: list[Example]):
    """The seed's method: one example at a time, all hidden states, per-example means, then mean per label."""
    per_label = {label: {kind: [] for kind in VECTOR_KINDS} for label in (0, 1)}
    for example in examples:
        prompt_len = len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(example.prompt + example.response, add_special_tokens=False, return_tensors="pt")
        states = torch.stack(hidden_states_without_final_norm(model, arch, **ids))[:, 0]  # [L+1, seq, h]
        per_label[example.label]["prompt_avg"].append(states[:, :prompt_len].mean(1))
        per_label[example.label]["response_avg"].append(states[:, prompt_len:].mean(1))
        per_label[example.label]["prompt_last"].append(states[:, prompt_len - 1])
    return {
        kind: torch.stack(per_label[1][kind]).mean(0) - torch.stack(per_label[0][kind]).mean(0)
        for kind in VECTOR_KINDS
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_extract_matches_output_hidden_states(arch, batch_size, tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs[arch]
    tokenizer = load_tokenizer(model_dir)
    pos_path, neg_path = write_csvs(tmp_path, tokenizer)
    paths = extract(
        model=model_dir,
        pos_path=str(pos_path),
        neg_path=str(neg_path),
        trait="evil",
        save_dir=str(tmp_path / "vectors"),
        batch_size=batch_size,
        hardware=Hardware(accelerator="cpu"),
    )
    model = load_model(model_dir)
    kept = [0, 1, 2, 3]
    examples = [
        Example(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTIONS[i]}], tokenize=False, add_generation_prompt=True
            ),
            answers[i],
            label,
            "",
        )
        for label, answers in ((1, POSITIVE), (0, NEGATIVE))
        for i in kept
    ]
    expected = reference_vectors(model, arch, tokenizer, examples)
    for kind in VECTOR_KINDS:
        got = load_vector(
            paths[kind], hidden_size=model.config.hidden_size, num_layers=model.config.num_hidden_layers
        )
        torch.testing.assert_close(got, expected[kind], rtol=1e-4, atol=1e-5)
        meta = load_metadata(paths[kind])
        assert meta["n_positive"] == 4 and meta["n_negative"] == 4 and meta["kind"] == kind


def test_batch_invariance(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    tokenizer = load_tokenizer(model_dir)
    pos_path, neg_path = write_csvs(tmp_path, tokenizer)
    one = extract(
        model=model_dir,
        pos_path=str(pos_path),
        neg_path=str(neg_path),
        trait="evil",
        save_dir=str(tmp_path / "b1"),
        batch_size=1,
        hardware=Hardware(accelerator="cpu"),
    )
    many = extract(
        model=model_dir,
        pos_path=str(pos_path),
        neg_path=str(neg_path),
        trait="evil",
        save_dir=str(tmp_path / "b8"),
        batch_size=8,
        hardware=Hardware(accelerator="cpu"),
    )
    for kind in VECTOR_KINDS:
        torch.testing.assert_close(load_vector(one[kind]), load_vector(many[kind]), rtol=1e-5, atol=1e-6)


def test_pairs_jsonl_route(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["qwen2"]
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as handle:
        for i, (q, p, n) in enumerate(zip(QUESTIONS, POSITIVE, NEGATIVE, strict=True)):
            handle.write(
                json.dumps(
                    {"prompt": q, "positive": p, "negative": n, "split": "test" if i == 4 else "train"}
                )
                + "\n"
            )
    paths = extract(
        model=model_dir,
        pairs_path=str(path),
        split="train",
        trait="evil",
        save_dir=str(tmp_path / "v"),
        hardware=Hardware(accelerator="cpu"),
    )
    meta = load_metadata(paths["response_avg"])
    assert meta["n_positive"] == 4 and meta["n_negative"] == 4
    assert torch.isfinite(load_vector(paths["response_avg"])).all()


def test_empty_filter_result_says_what_dropped(tiny_model_dirs, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    pos_path, neg_path = write_csvs(tmp_path, tokenizer)
    from persona.core.errors import (
        NoPairsLeft,  # its own type: the study falls back to no filter on this alone
    )

    with pytest.raises(NoPairsLeft, match=r"No effective pairs.*positive evil >= 99.*fails for 5 rows"):
        extract(
            model=tiny_model_dirs["llama"],
            pos_path=str(pos_path),
            neg_path=str(neg_path),
            trait="evil",
            threshold=99,
            save_dir=str(tmp_path / "v"),
        )
    assert not (tmp_path / "v").exists()


def test_missing_column_is_named(tiny_model_dirs, tmp_path):
    pd.DataFrame({"prompt": ["a"], "answer": ["b"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad\.csv: missing column\(s\) evil, coherence"):
        extract(
            model=tiny_model_dirs["llama"],
            pos_path=str(tmp_path / "bad.csv"),
            neg_path=str(tmp_path / "bad.csv"),
            trait="evil",
            save_dir=str(tmp_path / "v"),
        )


def test_empty_csv_is_an_error(tiny_model_dirs, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        extract(
            model=tiny_model_dirs["llama"],
            pos_path=str(tmp_path / "empty.csv"),
            neg_path=str(tmp_path / "empty.csv"),
            trait="evil",
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sidecar_records_negative_projection_percentiles_per_layer(arch, tiny_model_dirs, tmp_path):
    """Issue 25: capping ranges from data, from the extraction forward itself (no second pass)."""
    import numpy as np

    from persona.vectors.ranges import PERCENTILES_KEY, PROJECTION_PERCENTILES

    model_dir = tiny_model_dirs[arch]
    tokenizer = load_tokenizer(model_dir)
    pos_path, neg_path = write_csvs(tmp_path, tokenizer)
    paths = extract(
        model=model_dir,
        pos_path=str(pos_path),
        neg_path=str(neg_path),
        trait="evil",
        save_dir=str(tmp_path / "vectors"),
        batch_size=3,
        hardware=Hardware(accelerator="cpu"),
    )
    model = load_model(model_dir)
    for kind in VECTOR_KINDS:
        vector = load_vector(paths[kind])
        unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(
            1e-12
        )  # same prompts: prompt_avg rows are 0
        projections = []  # independent: one negative example at a time, all hidden states
        for i in range(4):  # the kept pairs
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTIONS[i]}], tokenize=False, add_generation_prompt=True
            )
            prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = tokenizer(prompt + NEGATIVE[i], add_special_tokens=False, return_tensors="pt")
            states = torch.stack(hidden_states_without_final_norm(model, arch, **ids))[:, 0]
            mean = {
                "prompt_avg": states[:, :prompt_len].mean(1),
                "response_avg": states[:, prompt_len:].mean(1),
                "prompt_last": states[:, prompt_len - 1],
            }[kind]
            projections.append((mean * unit).sum(-1))
        expected = np.percentile(torch.stack(projections).double().numpy(), PROJECTION_PERCENTILES, axis=0).T
        record = load_metadata(paths[kind])[PERCENTILES_KEY]
        assert record["percentiles"] == list(PROJECTION_PERCENTILES)
        np.testing.assert_allclose(np.array(record["per_layer"]), expected, rtol=1e-4, atol=1e-4)
