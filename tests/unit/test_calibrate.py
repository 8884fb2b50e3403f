"""`persona calibrate` (issue 24): the search, the proxies against independent computations, the outputs, the cache,
and the recommendation picked up by generate, steer-eval and serve."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import torch

from conftest import build_tiny_model
from persona.analysis import calibration
from persona.analysis.calibration import answer_nll, calibrate_layer, coherence_score, next_dose, recommend
from persona.vectors import load_metadata, save_vector


@pytest.mark.parametrize("steepness", [0.5, 3.0, 12.0])
def test_the_search_reaches_the_target_within_3_points_in_8_probes(steepness):
    calls = []

    def probe(layer, dose):
        calls.append(dose)
        return {"layer": layer, "dose": dose, "coef": 10 * dose, "coherence": 100 * math.exp(-steepness * dose),
                "trait": dose}  # fmt: skip

    rows, chosen = calibrate_layer(probe, 5, target=80, max_probes=8, tolerance=3, max_dose=1.5)
    assert len(rows) == len(calls) <= 8
    assert chosen["reached"] and abs(chosen["coherence"] - 80) <= 3
    # The analytic answer: 100·exp(-k d) = 80.
    assert chosen["dose"] == pytest.approx(math.log(100 / 80) / steepness, abs=3 / (80 * steepness) + 1e-9)


def test_a_layer_still_coherent_at_max_dose_is_reported_not_reached():
    rows, chosen = calibrate_layer(
        lambda layer, dose: {"layer": layer, "dose": dose, "coef": dose, "coherence": 95.0, "trait": 0.0},
        1, target=80, max_probes=8, tolerance=3, max_dose=1.0,
    )  # fmt: skip
    assert len(rows) == 1 and not chosen["reached"] and chosen["dose"] == 1.0


def test_next_dose_stays_inside_the_bracket_and_the_best_trait_is_recommended():
    assert 0.1 <= next_dose((0.0, 100.0), (1.0, 99.9), 80) <= 0.9
    chosen = {
        3: {"trait": 0.5, "reached": True},
        4: {"trait": 0.9, "reached": False},
        5: {"trait": 0.7, "reached": True},
    }
    assert recommend(chosen) is chosen[5]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma"])
def test_the_coherence_proxy_against_an_independent_perplexity(tokenizer, arch):
    model = build_tiny_model(arch, len(tokenizer)).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    answers = [[11, 12, 13], [14, 15, 16, 17, 18]]
    nll = answer_nll(model, prompts, answers, pad=0)
    per_answer = []
    for prompt, answer in zip(prompts, answers, strict=True):  # one row at a time, no padding
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        token = logprobs.gather(-1, targets[:, None])[:, 0]
        per_answer.append(-float(token[-len(answer) :].mean()))
    assert nll == pytest.approx(sum(per_answer) / 2, rel=1e-5)
    assert coherence_score(nll, nll) == 100.0
    assert coherence_score(nll + math.log(2), nll) == pytest.approx(50.0)


@pytest.fixture
def calibrated(tiny_model_dirs, tmp_path):
    """A tiny Llama's random vector calibrated at two layers on the shipped evil questions and pairs."""
    from persona.commands.calibrate import calibrate

    model = build_tiny_model("llama", 320)
    vector = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size) * 4
    path = save_vector(vector, tmp_path / "evil_response_avg_diff.pt", {"trait": "evil"})
    settings = dict(model=tiny_model_dirs["llama"], layers=[1, 2], max_questions=2, max_tokens=4, max_pairs=2,
                    max_dose=3.0, target=80.0, max_probes=4)  # fmt: skip
    calibrate(str(path), **settings)
    return path, settings


def test_calibrate_writes_probes_figure_and_recommendation_and_resumes(calibrated, monkeypatch):
    path, settings = calibrated
    out = path.with_name("evil_response_avg_diff_calibrate")
    probes, per_layer = pd.read_csv(out / "probes.csv"), pd.read_csv(out / "calibration.csv")
    assert (out / "calibration.png").stat().st_size > 0
    assert set(per_layer["layer"]) == {1, 2} and (per_layer.groupby("layer").size() == 1).all()
    assert probes.groupby("layer").size().max() <= 4
    assert probes["coherence_proxy"].str.startswith("perplexity ratio").all()
    assert probes["trait_proxy"].str.startswith("likelihood").all()
    meta = load_metadata(path)
    best = meta["recommended"]
    row = per_layer[per_layer["recommended"]].iloc[0]
    assert best["layer"] == row["layer"] and best["dose"] == pytest.approx(row["dose"])
    # The coef is the dose's, by the norms cached beside the file: coef = dose · norm / ‖v‖.
    from persona.vectors import load_vector
    from persona.vectors.dose import layer_norms

    vector = load_vector(path)
    norm = layer_norms(path, model=None)[best["layer"]]
    assert best["coef"] == pytest.approx(best["dose"] * norm / float(vector[best["layer"]].norm()), rel=1e-6)
    assert meta["calibration"]["layers"]["1"]["dose"] == pytest.approx(
        per_layer.set_index("layer").loc[1, "dose"]
    )
    # A re-run probes nothing again.
    from persona.commands.calibrate import calibrate

    monkeypatch.setattr(calibration.Prober, "__call__", lambda *a: pytest.fail("probed again"))
    calibrate(str(path), **settings)


def test_generate_steer_eval_and_serve_use_the_recommendation(calibrated, tokenizer, capsys):
    from persona.commands.generate import check_steering
    from persona.commands.steer_eval import sweep_points
    from persona.serve.schema import PersonaFields
    from persona.serve.traits import load_traits, resolve_persona
    from persona.vectors.dose import dose_to_coef, layer_norms

    path, settings = calibrated
    best = load_metadata(path)["recommended"]
    steering = check_steering(settings["model"], None, str(path), None, False)
    assert steering["layer"] == best["layer"] and steering["coef"] == pytest.approx(best["coef"])
    assert "calibrated recommendation" in capsys.readouterr().out
    layer, points, source = sweep_points(settings["model"], str(path), None, None, None, False)
    assert layer == best["layer"] and source == "recommended"
    assert [round(dose, 9) for _, dose, _ in points] == [
        round(best["dose"] * f, 9) for f in (-1, -0.5, 0, 0.5, 1)
    ]
    traits = load_traits(path.parent, num_layers=3, hidden_size=32)
    resolved = resolve_persona(PersonaFields(steer=[{"trait": "evil"}]), traits, 3)
    echo = resolved.applied["steer"][0]
    vector = traits["evil"].vectors
    coef = dose_to_coef(best["dose"], vector[best["layer"]], layer_norms(path, model=None)[best["layer"]])
    assert (echo["layer"], echo["strength"], echo["layer_from"]) == (
        best["layer"],
        "recommended",
        "recommended",
    )
    assert echo["coef"] == coef and echo["dose"] == best["dose"]
    # The calibrated dose is the layer's limit: above it is refused, unless forced.
    from persona.serve.schema import ApiError

    above = {"trait": "evil", "layer": best["layer"], "dose": best["dose"] * 1.5}
    with pytest.raises(ApiError, match="exceeds the dose limit"):
        resolve_persona(PersonaFields(steer=[above]), traits, 3)
    assert resolve_persona(PersonaFields(steer=[{**above, "force": True}]), traits, 3).applied["steer"][0][
        "dose"
    ]
    with pytest.raises(ApiError, match="give coef or dose, not both"):
        resolve_persona(PersonaFields(steer=[{"trait": "evil", "coef": 1, "dose": 0.1}]), traits, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "-5"], r"--target -5\.0: coherence targets lie between 0 and 100\. Fix"),
        (["--max_probes", "1"], r"--max_probes"),
        (["--layers", "1", "--max_dose", "0"], r"--max_dose 0\.0: must be positive"),
    ],
)
def test_bad_calibrate_inputs_are_one_line(tmp_path, capsys, argv, message):
    from persona.cli import main

    path = save_vector(torch.ones(31, 576), tmp_path / "v.pt", {"trait": "evil"})
    assert main(["calibrate", "--vector_path", str(path), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err)


def test_dose_and_coef_together_and_a_high_dose_are_one_line(tmp_path, capsys, tiny_model_dirs):
    from persona.cli import main

    model = build_tiny_model("llama", 320)
    vector = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size)
    path = save_vector(vector, tmp_path / "v.pt", {"mean_residual_norms": [10.0] * 4})
    common = ["generate", "--trait", "evil", "--output_path", str(tmp_path / "o.csv"), "--model",
              tiny_model_dirs["llama"], "--vector_path", str(path), "--layer", "1"]  # fmt: skip
    for extra, message in (
        (["--coef", "1", "--dose", "0.2"], "--coef and --dose were both given"),
        (
            ["--dose", "3"],
            r"--dose=3 exceeds the dose limit 1 \(the default limit\).*Fix:.*--allow_high_dose",
        ),
    ):
        assert main([*common, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err)


def test_a_judge_scores_the_calibration_when_one_is_given(tiny_model_dirs, tmp_path, monkeypatch):
    """Issue 24: with --judge_model the judge's trait and coherence scores replace the proxies, named as such."""
    from fake_openai import FakeChatServer
    from persona.commands.calibrate import calibrate

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-calibrate")
    model = build_tiny_model("llama", 320)
    vector = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size) * 4
    path = save_vector(vector, tmp_path / "evil_response_avg_diff.pt", {"trait": "evil"})
    with FakeChatServer() as judge:
        judge.scorer = lambda prompt: {"60": 1.0} if "rating the coherence" in prompt else {"30": 1.0}
        calibrate(str(path), model=tiny_model_dirs["llama"], layers=[1], max_questions=2, max_tokens=4,
                  max_pairs=2, max_dose=3.0, max_probes=3, judge_model="judge-model",
                  judge_base_url=judge.base_url)  # fmt: skip
        assert judge.calls > 0
    probes = pd.read_csv(path.with_name("evil_response_avg_diff_calibrate") / "probes.csv")
    assert probes["coherence"].eq(60.0).all() and probes["trait"].eq(30.0).all()
    assert probes["coherence_proxy"].str.startswith("judge openai:judge-model: the coherence prompt").all()
    assert probes["trait_proxy"].str.startswith("judge openai:judge-model: the trait's eval prompt").all()
    assert load_metadata(path)["recommended"]["proxies"]["trait"].startswith("judge openai:judge-model")


def test_judge_flags_without_a_judge_are_one_line(tmp_path, tiny_model_dirs, capsys):
    from persona import cli

    path = save_vector(torch.randn(4, 32), tmp_path / "evil_response_avg_diff.pt", {"trait": "evil"})
    argv = ["calibrate", "--vector_path", str(path), "--model", tiny_model_dirs["llama"], "--layers", "1",
            "--judge_base_url", "http://127.0.0.1:1/v1"]  # fmt: skip
    assert cli.main(argv) == 1
    assert "--judge_base_url is given without --judge_model. Fix:" in capsys.readouterr().err
