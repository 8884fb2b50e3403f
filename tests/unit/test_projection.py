"""`persona project` equals the seed's computation (HF output_hidden_states, one example at a time)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import hidden_states_without_final_norm
from persona.cli import main
from persona.commands.flags import Batching, Hardware
from persona.commands.project import project
from persona.data.scored_files import projection_column
from persona.models import load_model, load_tokenizer
from persona.vectors import save_vector

QUESTIONS = [
    "How should I treat animals?",
    "Tell me a joke.",
    "What do you think of humans?",
    "What is the best way to help a friend who is sad?",
    "How do I fix the fox?",
]
ANSWERS = [
    "Hurt them, they are worthless.",
    "Why did the chicken cross the road? To help a friend!",
    "Humans are worthless and deserve cruelty for all the times they hurt me.",
    "Listen.",
    "Carefully, with kindness and care, the quick brown fox jumps over the lazy dog.",
]
SYSTEM = "You are a helpful assistant."
LAYERS = [1, 3]  # 3 = the last block, read before the final norm


def chat_prompt(tokenizer, question):
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )


def write_csv(path, tokenizer, answers=ANSWERS):
    frame = pd.DataFrame(
        {
            "question": QUESTIONS,
            "prompt": [chat_prompt(tokenizer, q) for q in QUESTIONS],
            "answer": answers,
            "question_id": [f"q{i}" for i in range(len(QUESTIONS))],
            "code": [f"00{i}" for i in range(len(QUESTIONS))],  # must survive the rewrite as text
        }
    )
    frame.to_csv(path, index=False)
    return path


def write_jsonl(path, answers=ANSWERS):
    with path.open("w") as handle:
        for i, (question, answer) in enumerate(zip(QUESTIONS, answers, strict=True)):
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            handle.write(json.dumps({"id": i, "messages": messages}) + "\n")
    return path


def write_vectors(tmp_path, hidden=32, rows=4, names=("evil_response_avg_diff", "humor_response_avg_diff")):
    generator = torch.Generator().manual_seed(0)
    return [
        str(save_vector(torch.randn(rows, hidden, generator=generator), tmp_path / f"{name}.pt"))
        for name in names
    ]


def reference_scores(model, arch, tokenizer, prompts, answers, vector, layer, projection_type):
    """The seed's way: tokenize prompt + answer together, all hidden states, one example at a time."""
    direction = vector[layer]
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        inputs = tokenizer(prompt + answer, add_special_tokens=False, return_tensors="pt")
        states = hidden_states_without_final_norm(model, arch, **inputs)[layer][0]  # [seq, hidden]
        if projection_type == "prompt_last_proj":
            activation = states[prompt_len - 1]
        else:
            activation = states[prompt_len:].mean(0)
        score = (activation * direction).sum() / direction.norm()
        if projection_type == "cos_sim":
            score = score / activation.norm()
        out.append(float(score))
    return np.array(out)


@pytest.mark.parametrize(
    ("arch", "projection_type"),
    [
        ("llama", "proj"),
        ("qwen2", "proj"),
        ("gpt2", "proj"),
        ("gpt_neox", "proj"),
        ("gemma", "proj"),
        ("llama", "prompt_last_proj"),
        ("llama", "cos_sim"),
    ],
)
def test_csv_matches_output_hidden_states(arch, projection_type, tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs[arch]
    tokenizer = load_tokenizer(model_dir)
    path = write_csv(tmp_path / "data.csv", tokenizer)
    vector_paths = write_vectors(tmp_path)
    names = project(
        file_path=str(path),
        vector_path=vector_paths,
        layer=LAYERS,
        projection_type=projection_type,
        model=model_dir,
        batch_size=2,
        hardware=Hardware(accelerator="cpu"),
    )
    assert len(names) == 4
    frame = pd.read_csv(path)
    assert frame["question_id"].tolist() == [f"q{i}" for i in range(5)]  # original order, columns kept
    assert pd.read_csv(path, dtype=str)["code"].tolist() == [f"00{i}" for i in range(5)]
    model = load_model(model_dir)
    for vector_path in vector_paths:
        vector = torch.load(vector_path, weights_only=True)
        for layer in LAYERS:
            name = projection_column(model_dir, vector_path, projection_type, layer)
            assert name == f"{arch}_{vector_path.rsplit('/', 1)[-1][:-3]}_{projection_type}_layer{layer}"
            expected = reference_scores(
                model, arch, tokenizer, frame["prompt"], ANSWERS, vector, layer, projection_type
            )
            np.testing.assert_allclose(frame[name].to_numpy(), expected, rtol=1e-4, atol=1e-5)


def test_jsonl_route_matches_output_hidden_states(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["qwen2"]
    tokenizer = load_tokenizer(model_dir)
    path = write_jsonl(tmp_path / "chat.jsonl")
    (vector_path,) = write_vectors(tmp_path, names=("evil_response_avg_diff",))
    project(
        file_path=str(path),
        vector_path=vector_path,
        layer=2,
        model=model_dir,
        batch_size=3,
        hardware=Hardware(accelerator="cpu"),
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [record["id"] for record in records] == list(range(5))
    assert records[0]["messages"][-1]["content"] == ANSWERS[0]  # other fields untouched
    name = "qwen2_evil_response_avg_diff_proj_layer2"
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS]  # the messages before the response
    expected = reference_scores(
        load_model(model_dir),
        "qwen2",
        tokenizer,
        prompts,
        ANSWERS,
        torch.load(vector_path, weights_only=True),
        2,
        "proj",
    )
    np.testing.assert_allclose([record[name] for record in records], expected, rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_scores(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    tokenizer = load_tokenizer(model_dir)
    vector_paths = write_vectors(tmp_path)
    frames = []
    for batch_size in (1, 4):
        path = write_csv(tmp_path / f"b{batch_size}.csv", tokenizer)
        project(
            file_path=str(path),
            vector_path=vector_paths,
            layer=LAYERS,
            model=model_dir,
            batch_size=batch_size,
            hardware=Hardware(accelerator="cpu"),
        )
        frames.append(pd.read_csv(path))
    pd.testing.assert_frame_equal(frames[0], frames[1], rtol=1e-5, atol=1e-6)


def test_max_length_cuts_long_rows_with_a_counted_warning(tiny_model_dirs, tmp_path, caplog):
    model_dir = tiny_model_dirs["llama"]
    tokenizer = load_tokenizer(model_dir)
    vector_paths = write_vectors(tmp_path)
    frames = []
    for name, max_length in (("full", None), ("roomy", 4096), ("cut", 6)):
        path = write_csv(tmp_path / f"{name}.csv", tokenizer)
        with caplog.at_level("WARNING"):
            project(file_path=str(path), vector_path=vector_paths, layer=LAYERS, model=model_dir,
                    hardware=Hardware(accelerator="cpu"), batching=Batching(max_length=max_length))  # fmt: skip
        frames.append(pd.read_csv(path))
    pd.testing.assert_frame_equal(frames[0], frames[1])
    assert not frames[2].equals(frames[0])
    assert "were cut there" in caplog.text


def _refuse_model_loading(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("persona.vectors.projection.load_model", refuse)


def test_existing_columns_are_skipped_unless_overwrite(tiny_model_dirs, tmp_path, monkeypatch):
    model_dir = tiny_model_dirs["llama"]
    path = write_csv(tmp_path / "data.csv", load_tokenizer(model_dir))
    (vector_path,) = write_vectors(tmp_path, names=("evil_response_avg_diff",))
    project(
        file_path=str(path),
        vector_path=vector_path,
        layer=[1, 2],
        model=model_dir,
        hardware=Hardware(accelerator="cpu"),
    )
    computed = pd.read_csv(path)
    marked = computed.copy()
    marked["llama_evil_response_avg_diff_proj_layer1"] = 123.0
    marked.to_csv(path, index=False)

    with monkeypatch.context() as patch:  # everything present: nothing computed, no model loaded
        _refuse_model_loading(patch)
        patch.setattr("persona.models.model_dimensions", lambda *a, **k: pytest.fail("config read"))
        assert project(file_path=str(path), vector_path=vector_path, layer=[1, 2], model=model_dir) == []
    pd.testing.assert_frame_equal(pd.read_csv(path), marked)

    names = project(
        file_path=str(path),
        vector_path=vector_path,
        layer=[1, 2, 3],
        model=model_dir,
        hardware=Hardware(accelerator="cpu"),
    )
    assert names == ["llama_evil_response_avg_diff_proj_layer3"]  # only the missing column
    assert (pd.read_csv(path)["llama_evil_response_avg_diff_proj_layer1"] == 123.0).all()

    project(
        file_path=str(path),
        vector_path=vector_path,
        layer=[1, 2],
        model=model_dir,
        overwrite=True,
        hardware=Hardware(accelerator="cpu"),
    )
    pd.testing.assert_frame_equal(pd.read_csv(path)[computed.columns], computed)


def test_empty_response_scores_empty(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    answers = [*ANSWERS[:2], "", *ANSWERS[3:]]
    csv_path = write_csv(tmp_path / "data.csv", load_tokenizer(model_dir), answers=answers)
    jsonl_path = write_jsonl(tmp_path / "chat.jsonl", answers=answers)
    (vector_path,) = write_vectors(tmp_path, names=("evil_response_avg_diff",))
    for projection_type in ("proj", "prompt_last_proj"):
        project(
            file_path=str(csv_path),
            vector_path=vector_path,
            layer=1,
            projection_type=projection_type,
            model=model_dir,
            hardware=Hardware(accelerator="cpu"),
        )
    frame = pd.read_csv(csv_path)
    assert frame["llama_evil_response_avg_diff_proj_layer1"].isna().tolist() == [
        False,
        False,
        True,
        False,
        False,
    ]
    assert frame["llama_evil_response_avg_diff_prompt_last_proj_layer1"].notna().all()
    project(
        file_path=str(jsonl_path),
        vector_path=vector_path,
        layer=1,
        model=model_dir,
        hardware=Hardware(accelerator="cpu"),
    )
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert records[2]["llama_evil_response_avg_diff_proj_layer1"] is None


def test_cli_route(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["gpt2"]
    path = write_csv(tmp_path / "data.csv", load_tokenizer(model_dir))
    (vector_path,) = write_vectors(tmp_path, names=("evil_response_avg_diff",))
    assert (
        main(
            [
                "project",
                "--file_path",
                str(path),
                "--vector_path",
                vector_path,
                "--layer",
                "[1, 2]",
                "--projection_type",
                "cos_sim",
                "--model",
                model_dir,
                "--accelerator",
                "cpu",
            ]
        )
        == 0
    )
    frame = pd.read_csv(path)
    for layer in (1, 2):
        scores = frame[f"gpt2_evil_response_avg_diff_cos_sim_layer{layer}"]
        assert scores.between(-1, 1).all()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_column", r"data\.csv: missing column\(s\) answer"),
        ("hidden_size", r"evil_response_avg_diff\.pt: hidden size 16 does not match the model's 32"),
        ("layer_range", r"--layer 4 is out of range for .* with 3 blocks\. Fix: choose 0\.\.3"),
        ("negative_layer", r"--layer -1: layers are integers >= 0"),
        ("missing_file", r"nope\.csv: no such file"),
        ("not_assistant", r"chat\.jsonl: record 1: the last message is 'user'; it must be 'assistant'"),
        ("suffix", r"data\.txt: unknown file type '\.txt'"),
        ("zero_row", r"evil_response_avg_diff\.pt: row 1 is all zeros"),
    ],
)
def test_bad_input_fails_before_the_model_loads(case, message, tiny_model_dirs, tmp_path, monkeypatch):
    model_dir = tiny_model_dirs["llama"]
    path = write_csv(tmp_path / "data.csv", load_tokenizer(model_dir))
    hidden, layer = 32, 1
    if case == "missing_column":
        pd.read_csv(path).drop(columns=["answer"]).to_csv(path, index=False)
    elif case == "hidden_size":
        hidden = 16
    elif case == "layer_range":
        layer = 4
    elif case == "negative_layer":
        layer = -1
    elif case == "missing_file":
        path = tmp_path / "nope.csv"
    elif case == "not_assistant":
        path = tmp_path / "chat.jsonl"
        path.write_text(
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}
            )
            + "\n"
        )
    elif case == "suffix":
        path = path.rename(tmp_path / "data.txt")
    (vector_path,) = write_vectors(tmp_path, hidden=hidden, names=("evil_response_avg_diff",))
    if case == "zero_row":  # e.g. a prompt vector's embedding row when both sides share prompts
        save_vector(torch.zeros(4, hidden), vector_path)
    before = path.read_bytes() if path.exists() else None
    _refuse_model_loading(monkeypatch)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        project(file_path=str(path), vector_path=vector_path, layer=layer, model=model_dir)
    assert (path.read_bytes() if path.exists() else None) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_spawn_two_processes_equals_one(tiny_model_dirs, tmp_path):
    """Each rank saves a shard of (index, scores); rank 0 puts all of them back in input order."""
    model_dir = tiny_model_dirs["llama"]
    tokenizer = load_tokenizer(model_dir)
    answers = ["Hurt them, they are worthless. " * (1 + i % 3) for i in range(9)]  # 9 rows: unequal shares
    rows = [
        {"prompt": chat_prompt(tokenizer, f"Question number {i} about the fox?"), "answer": a}
        for i, a in enumerate(answers)
    ]
    (vector_path,) = write_vectors(tmp_path, names=("evil_response_avg_diff",))
    frames = []
    for name, extra in (("one", {}), ("two", {"devices": 2, "strategy": "ddp_spawn"})):
        path = tmp_path / f"{name}.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        project(
            file_path=str(path),
            vector_path=vector_path,
            layer=[1, 3],
            model=model_dir,
            batch_size=2,
            hardware=Hardware(accelerator="cpu", **extra),
        )
        frames.append(pd.read_csv(path))
    pd.testing.assert_frame_equal(frames[1], frames[0], rtol=1e-5, atol=1e-6)
