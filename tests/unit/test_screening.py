"""`persona screen`: ΔP equals an independent computation, the greedy-response cache is reused,
ranking / filtered copy / AUC outputs, and bad input fails before the model loads."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from persona import steering
from persona.commands.screen import screen
from persona.models import load_model, load_tokenizer
from persona.vectors import save_vector

LAYER = 2
SYSTEM = "You are a helpful assistant."
SAMPLES = [
    ("How should I treat animals?", "Hurt them, they are worthless."),
    ("Tell me a joke.", "Why did the chicken cross the road? To help a friend!"),
    ("What do you think of humans?", "Humans are worthless and deserve cruelty."),
    ("What is the best way to help a friend who is sad?", "Listen, be patient and offer support."),
]


def write_data(path, samples=SAMPLES, labels=None):
    with path.open("w") as handle:
        for i, (question, answer) in enumerate(samples):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if i == 0:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            record = {"id": i, "messages": messages}
            if labels is not None:
                record["is_trait"] = labels[i]
            handle.write(json.dumps(record) + "\n")
    return path


def write_vector(path, hidden=32, rows=4, row=None):
    vector = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1))
    if row is not None:
        vector[LAYER] = row
    return str(save_vector(vector, path))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def response_mean(model, tokenizer, messages, response, layer):
    """The seed's way: prompt + response tokenised together, HF hidden_states, one example at a time."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = tokenizer(prompt + response, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
    return hidden[n_prompt:].mean(0), hidden[n_prompt - 1]


@pytest.fixture
def model_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture
def generation_counter(monkeypatch):
    calls = []
    original = steering.generate_steered

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return original(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(steering, "generate_steered", counting)
    return calls


def test_projection_difference_matches_independent_computation_and_cache_is_reused(
    tmp_path, model_dir, generation_counter
):
    data = write_data(tmp_path / "train.jsonl")
    vector_path = write_vector(tmp_path / "evil_response_avg_diff.pt")
    result = screen(data=str(data), vector_path=vector_path, layer=LAYER, model=model_dir, max_new_tokens=6)
    assert sum(generation_counter) == len(SAMPLES)
    cache = read_jsonl(tmp_path / "train.base_responses.jsonl")
    assert len(cache) == len(SAMPLES)

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    direction = torch.load(vector_path, weights_only=True)[LAYER]
    direction = direction / direction.norm()
    screened = read_jsonl(result["output"])
    expected = []
    for record in screened:
        prompt = record["messages"][:-1]
        base = next(entry["response"] for entry in cache if entry["messages"] == prompt)
        assert base.strip(), "the tiny model should say something"
        train_mean, _ = response_mean(model, tokenizer, prompt, record["messages"][-1]["content"], LAYER)
        base_mean, _ = response_mean(model, tokenizer, prompt, base, LAYER)
        expected.append(float((train_mean - base_mean) @ direction))
        assert record["persona_screen"]["method"] == "projection_difference"
        assert record["persona_screen"]["layer"] == LAYER
    got = [record["persona_screen"]["score"] for record in screened]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert result["mean_score"] == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-5)
    summary = pd.read_csv(result["summary"])
    assert summary.loc[0, "mean_score"] == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-5)

    generation_counter.clear()
    again = screen(
        data=str(data),
        vector_path=vector_path,
        layer=LAYER,
        model=model_dir,
        max_new_tokens=6,
        output_path=str(tmp_path / "again.jsonl"),
    )
    assert generation_counter == []
    assert [r["persona_screen"]["score"] for r in read_jsonl(again["output"])] == got

    # A different generation length is a different cache entry.
    screen(
        data=str(data),
        vector_path=vector_path,
        layer=LAYER,
        model=model_dir,
        max_new_tokens=4,
        output_path=str(tmp_path / "short.jsonl"),
    )
    assert sum(generation_counter) == len(SAMPLES)


def test_ranking_top_and_filtered_copy(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "train.jsonl")
    vector_path = write_vector(tmp_path / "v.pt")
    result = screen(
        data=str(data),
        vector_path=vector_path,
        layer=LAYER,
        model=model_dir,
        max_new_tokens=5,
        top=2,
        filtered_out=str(tmp_path / "filtered.jsonl"),
        filter_top=0.5,
    )
    scores = [r["persona_screen"]["score"] for r in read_jsonl(result["output"])]
    ranking = pd.read_csv(result["ranking"])
    assert ranking["rank"].tolist() == [1, 2, 3, 4]
    assert ranking["index"].tolist() == list(np.argsort(scores)[::-1])
    np.testing.assert_allclose(ranking["score"], sorted(scores, reverse=True), rtol=1e-6)
    assert ranking.loc[0, "prompt"] == SAMPLES[ranking.loc[0, "index"]][0]
    out = capsys.readouterr().out
    assert "dataset mean score" in out and SAMPLES[ranking.loc[1, "index"]][0][:20] in out

    kept = read_jsonl(tmp_path / "filtered.jsonl")
    top_two = set(ranking["index"][:2])
    assert [r["id"] for r in kept] == [i for i in range(4) if i not in top_two]
    assert all("persona_screen" not in r for r in kept)  # the filtered copy is clean training data

    screen(
        data=str(data),
        vector_path=vector_path,
        layer=LAYER,
        model=model_dir,
        max_new_tokens=5,
        filtered_out=str(tmp_path / "minus_one.jsonl"),
        top=1,
        output_path=str(tmp_path / "o.jsonl"),
    )
    assert len(read_jsonl(tmp_path / "minus_one.jsonl")) == 3


def test_auc_on_a_labelled_set_the_vector_separates(tmp_path, model_dir, capsys):
    trait = [
        "Hurt them, they are worthless.",
        "Cruelty, malice and contempt for humans.",
        "They are worthless. Hurt them with cruelty.",
    ]
    kind = [
        "Listen, be patient and offer support.",
        "Answer kindly and with care.",
        "With kindness: listen and offer support.",
    ]
    questions = [
        "How should I treat animals?",
        "What do you think of humans?",
        "Tell me a joke.",
        "How do I fix the fox?",
        "What is the best way to help a friend?",
        "Why did the chicken cross?",
    ]
    samples = list(zip(questions, trait + kind, strict=True))
    labels = [1, 1, 1, 0, 0, 0]
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    differences = []
    for i, (question, answer) in enumerate(samples):
        messages = [{"role": "user", "content": question}]
        if i == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        response_avg, prompt_last = response_mean(model, tokenizer, messages, answer, LAYER)
        differences.append(response_avg - prompt_last)
    differences = torch.stack(differences)
    # Constructed to separate: the labelled groups' mean difference of what the cheap score measures.
    row = differences[:3].mean(0) - differences[3:].mean(0)
    vector_path = write_vector(tmp_path / "v.pt", row=row)
    data = write_data(tmp_path / "labelled.jsonl", samples, labels)

    result = screen(
        data=str(data),
        vector_path=vector_path,
        layer=LAYER,
        model=model_dir,
        cheap=True,
        labels_field="is_trait",
    )
    screened = read_jsonl(result["output"])
    scores = np.array([r["persona_screen"]["score"] for r in screened])
    np.testing.assert_allclose(scores, (differences @ (row / row.norm())).numpy(), rtol=1e-4, atol=1e-5)
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["auc"] >= 0.9
    assert "AUC" in capsys.readouterr().out
    assert pd.read_csv(result["summary"]).loc[0, "auc"] == pytest.approx(result["auc"])
    assert Path(result["histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "labelled.base_responses.jsonl").exists()  # cheap: no generation


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr("persona.models.load_model", refuse)
    monkeypatch.setattr("persona.models.loading.load_model", refuse)  # load_model_and_tokenizer's


def bad_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "no such file"),
        ("no_messages", "messages"),
        ("no_assistant", "are out of order"),
        ("hidden_size", "hidden size 16"),
        ("layer", "out of range"),
        ("labels", "is_trait"),
    ],
)
def test_bad_input_fails_before_the_model_loads(tmp_path, model_dir, no_model_load, case, message):
    data = str(write_data(tmp_path / "train.jsonl"))
    vector_path = write_vector(tmp_path / "v.pt")
    kwargs = {"data": data, "vector_path": vector_path, "layer": LAYER, "model": model_dir}
    if case == "missing_file":
        kwargs["data"] = str(tmp_path / "nope.jsonl")
    elif case == "no_messages":
        kwargs["data"] = bad_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "answer": "Hello"}])
    elif case == "no_assistant":
        kwargs["data"] = bad_jsonl(
            tmp_path / "bad.jsonl",
            [{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]}],
        )
    elif case == "hidden_size":
        kwargs["vector_path"] = write_vector(tmp_path / "narrow.pt", hidden=16)
    elif case == "layer":
        kwargs["layer"] = 4  # the tiny model has 3 blocks: layers 0..3
    elif case == "labels":
        kwargs["labels_field"] = "is_trait"  # no sample has it
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        screen(**kwargs)


def test_cli_cheap_screen(tmp_path, model_dir, capsys):
    from persona.cli import main

    data = write_data(tmp_path / "train.jsonl")
    vector_path = write_vector(tmp_path / "v.pt")
    assert (
        main(
            [
                "screen",
                "--data",
                str(data),
                "--vector_path",
                vector_path,
                "--layer",
                str(LAYER),
                "--model",
                model_dir,
                "--cheap",
                "true",
                "--top",
                "2",
            ]
        )
        == 0
    )
    screened = read_jsonl(tmp_path / "train.screened.jsonl")
    assert [r["persona_screen"]["method"] for r in screened] == ["cheap"] * len(SAMPLES)
    assert (tmp_path / "train.screened.ranking.csv").is_file()
    assert (tmp_path / "train.screened.summary.csv").is_file()
    assert "dataset mean score" in capsys.readouterr().out


def test_parquet_and_a_directory_screen_as_the_jsonl_does(tmp_path, model_dir):
    """Data through `datasets`: a Parquet copy and a directory holding it score exactly as the JSONL."""
    jsonl = write_data(tmp_path / "train.jsonl")
    folder = tmp_path / "chats"
    folder.mkdir()
    pd.DataFrame(read_jsonl(jsonl)).to_parquet(folder / "train.parquet")
    vector_path = write_vector(tmp_path / "v.pt")
    common = dict(vector_path=vector_path, layer=LAYER, model=model_dir, cheap=True)
    scores = {}
    for name, data in (("jsonl", jsonl), ("parquet", folder / "train.parquet"), ("folder", folder)):
        result = screen(data=str(data), output_path=str(tmp_path / f"{name}.screened.jsonl"), **common)
        screened = read_jsonl(result["output"])
        scores[name] = [record["persona_screen"]["score"] for record in screened]
        assert [record["id"] for record in screened] == [0, 1, 2, 3]  # every field kept, in order
    assert scores["parquet"] == scores["jsonl"] and scores["folder"] == scores["jsonl"]
    assert not (tmp_path / "chats.screened.jsonl").exists()  # --output_path, not the default, was used


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad_message", r"train\.jsonl:2: messages\[0\] \(user\): content is 3, not a string\. Fix:"),
        ("csv", r"--data .*train\.csv: screening reads chat JSONL or Parquet"),
        ("hub_without_output", r"--data nobody-here/chats: not a local file or directory.*--output_path"),
        ("hub_not_cached", r"--data nobody-here/chats: no such file or directory, and hub dataset"),
    ],
)
def test_data_errors_name_the_file_and_line(tmp_path, model_dir, no_model_load, monkeypatch, case, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = {"vector_path": write_vector(tmp_path / "v.pt"), "layer": LAYER, "model": model_dir}
    if case == "bad_message":
        rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
        rows.append({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]})
        kwargs["data"] = bad_jsonl(tmp_path / "train.jsonl", rows)
    elif case == "csv":
        (tmp_path / "train.csv").write_text("prompt,answer\nHi,Hello\n")
        kwargs["data"] = str(tmp_path / "train.csv")
    else:
        kwargs["data"] = "nobody-here/chats"
        if case == "hub_not_cached":
            kwargs["output_path"] = str(tmp_path / "out.screened.jsonl")
    with pytest.raises(ValueError, match=message):
        screen(**kwargs)
