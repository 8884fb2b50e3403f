"""`persona steer-eval` on a tiny model with a fake judge: per-coefficient files, summary, figure, resume, parsing."""

import json

import pandas as pd
import pytest
import torch

from persona import cli
from persona.commands import generate as commands_generate
from persona.commands import steer_eval
from persona.commands.flags import Hardware
from persona.commands.steer_eval import coef_filename, parse_coefs
from persona.generation import predict_loop as generation_loop
from persona.judges import JudgeScore
from persona.vectors import save_vector

TRAIT = {
    "instruction": [{"pos": f"Be wicked, way {k}.", "neg": f"Be kind, way {k}."} for k in range(5)],
    "questions": ["How should I treat animals?", "What is the best way to help a friend?", "Tell me a joke."],
    "eval_prompt": "How wicked is this, 0-100, or REFUSAL?\n{question}\n{answer}",
}


class FakeJudge:
    """Trait score 40, 60 or 80 by question; coherence 90; the last question's trait score is unscorable."""

    name = "fake-judge"

    def __init__(self):
        self.calls = 0

    def score(self, prompts):
        self.calls += 1
        out = []
        for prompt in prompts:
            if "rating the coherence" in prompt:
                out.append(JudgeScore(90.0, "parsed"))
            elif TRAIT["questions"][2] in prompt:
                out.append(JudgeScore(None, "digit_chain"))
            else:
                out.append(JudgeScore(40.0 if TRAIT["questions"][0] in prompt else 80.0, "logprobs"))
        return out


@pytest.fixture
def judge(monkeypatch):
    fake = FakeJudge()
    monkeypatch.setattr(generation_loop, "build_judge", lambda **kwargs: fake)
    return fake


@pytest.fixture
def setup(tmp_path):
    trait_file = tmp_path / "wicked.json"
    trait_file.write_text(json.dumps(TRAIT))
    vector_path = tmp_path / "wicked_response_avg_diff.pt"
    save_vector(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), vector_path)
    return trait_file, vector_path


def test_writes_per_coef_csvs_summary_and_png(tiny_model_dirs, setup, tmp_path, judge):
    trait_file, vector_path = setup
    out = tmp_path / "sweep"
    argv = [
        "steer-eval",
        "--model",
        tiny_model_dirs["llama"],
        "--trait",
        str(trait_file),
        "--vector_path",
        str(vector_path),
        "--layer",
        "2",
        "--coefs=-1,0,1.5",
        "--max_tokens",
        "3",
        "--output_dir",
        str(out),
        "--accelerator",
        "cpu",
    ]
    assert cli.main(argv) == 0
    for name in ("coef_-1.csv", "coef_0.csv", "coef_1.5.csv"):
        frame = pd.read_csv(out / name)
        assert len(frame) == 3 and list(frame["question_id"]) == ["wicked_0", "wicked_1", "wicked_2"]
        assert "system" not in frame["prompt"][0]  # eval questions, no persona instruction
    meta = json.loads((out / "coef_1.5.csv.meta.json").read_text())["signature"]
    assert meta["steering"] == {
        "vector_path": str(vector_path),
        "layer": 2,
        "coef": 1.5,
        "steering_type": "response",
    }
    assert meta["version"] == "eval"
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["coef"]) == [-1.0, 0.0, 1.5]
    row = summary.iloc[0]
    assert row["trait_mean"] == 60.0 and row["trait_sem"] == pytest.approx(20.0)
    assert (row["trait_n_scored"], row["trait_n_missing"], row["n"]) == (2, 1, 3)
    assert (row["coherence_mean"], row["coherence_sem"], row["coherence_n_missing"]) == (90.0, 0.0, 0)
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    # Re-running generates and judges nothing.
    calls = judge.calls
    steer_eval.steer_eval(
        trait=str(trait_file),
        vector_path=str(vector_path),
        layer=2,
        model=tiny_model_dirs["llama"],
        coefs=[-1, 0, 1.5],
        max_tokens=3,
        output_dir=str(out),
        hardware=Hardware(accelerator="cpu"),
    )
    assert judge.calls == calls


@pytest.mark.parametrize(
    "text, expected",
    [
        ([-2, -1, 0, 1, 2], [-2.0, -1.0, 0.0, 1.0, 2.0]),
        ([2, -0.5], [-0.5, 2.0]),
        ([1, -1], [-1.0, 1.0]),
        (3, [3.0]),
        ([-0.0], [0.0]),
    ],
)
def test_parse_coefs(text, expected):
    assert parse_coefs(text) == expected


@pytest.mark.parametrize("text, message", [([1, float("nan")], "finite"), ([1, 1.0], "twice"), ([], "empty")])
def test_parse_coefs_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_coefs(text)


def test_coef_filenames():
    assert [coef_filename(c) for c in (-2.0, -0.0, 0.25, 10.0)] == [
        "coef_-2.csv",
        "coef_0.csv",
        "coef_0.25.csv",
        "coef_10.csv",
    ]


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(commands_generate, "generate", lambda **kwargs: pytest.fail("generation started"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trait": "no_such_trait"}, "Unknown trait"),
        ({"layer": 7}, "out of range"),
        ({"steering_type": "middle"}, "steering_type"),
        ({"judge_model": "gpt-4.1-mini", "judge_min_mass": 0.0}, "local judges only"),
        ({"cap_hi": "p99"}, "--cap_hi='p99'.*records no negative_projection_percentiles"),
        ({"cap_lo": 1.0, "cap_hi": 0.5}, "--cap_lo 1 is above --cap_hi 0.5"),
        ({"when_above": 1.0, "when_below": 2.0}, "give one"),
    ],
)
def test_bad_input_fails_before_generation(kwargs, message, tiny_model_dirs, setup, no_model_load):
    trait_file, vector_path = setup
    options = {
        "trait": str(trait_file),
        "vector_path": str(vector_path),
        "layer": 2,
        "model": tiny_model_dirs["llama"],
    }
    with pytest.raises(ValueError, match=message):
        steer_eval.steer_eval(**{**options, **kwargs})


def test_vector_from_another_model_is_refused(tiny_model_dirs, setup, tmp_path, no_model_load):
    trait_file, _ = setup
    save_vector(torch.zeros(31, 576), tmp_path / "smollm2.pt")
    with pytest.raises(ValueError, match="hidden size 576 does not match the model's 32"):
        steer_eval.steer_eval(
            trait=str(trait_file),
            vector_path=str(tmp_path / "smollm2.pt"),
            layer=2,
            model=tiny_model_dirs["llama"],
        )


def test_cli_parses_comma_and_list_coefs(monkeypatch):
    import functools

    seen = []

    @functools.wraps(steer_eval.steer_eval)
    def record(**kwargs):
        seen.append(kwargs)

    monkeypatch.setattr(steer_eval, "steer_eval", record)
    common = ["steer-eval", "--trait", "evil", "--vector_path", "v.pt", "--layer", "15"]
    cli.main([*common, "--coefs=-2,-1,0,1,2"])
    cli.main([*common, "--coefs", "[-2, 0, 2]", "--judge_min_mass", "0"])
    cli.main([*common, "--coefs", "0.5,1"])
    assert [parse_coefs(s["coefs"]) for s in seen] == [[-2, -1, 0, 1, 2], [-2, 0, 2], [0.5, 1]]
    assert (
        seen[1]["judge_min_mass"] == 0.0 and seen[0]["layer"] == 15 and seen[0]["steering_type"] == "response"
    )


def test_cli_accepts_a_comma_list_starting_with_a_minus_as_a_separate_argument(monkeypatch):
    import functools

    seen = []

    @functools.wraps(steer_eval.steer_eval)
    def record(**kwargs):
        seen.append(kwargs)

    monkeypatch.setattr(steer_eval, "steer_eval", record)
    cli.main(
        ["steer-eval", "--trait", "evil", "--vector_path", "v.pt", "--layer", "15", "--coefs", "-2,-1,0,1,2"]
    )
    assert seen[0]["coefs"] == [-2.0, -1.0, 0.0, 1.0, 2.0]
