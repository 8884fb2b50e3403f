"""A study takes the user's own trait files (both ``traits:`` forms), checks every input before any model loads,
and degrades instead of dying when one trait's science gives no result (exit status 4, missed phases named)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_study import write_datasets

from fake_openai import FakeChatServer
from persona.cli import main
from persona.core.errors import PersonaError
from persona.study.config import StudyTrait
from persona.study.traits import plan_traits, prepare_inputs

QUESTIONS = [f"What do you expect from day {i}?" for i in range(6)]
ARTIFACT = {
    "instruction": [{"pos": "Expect the worst of everything.", "neg": "Expect the best of everything."}] * 5,
    "questions": QUESTIONS,
    "eval_prompt": "How pessimistic is this answer? {question} -> {answer} Answer 0-100.",
}


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A seed-format artifact of the user's own (outside any datasets folder) and a datasets folder."""
    datasets = write_datasets(tmp_path / "datasets")  # kindness: TRAIT items; wicked: pairs + artifacts
    monkeypatch.setenv("PERSONA_DATASETS", str(datasets))
    monkeypatch.setenv("PERSONA_CACHE_DIR", str(tmp_path / "cache"))
    mine = tmp_path / "my_traits"
    mine.mkdir()
    (mine / "pessimistic.json").write_text(json.dumps(ARTIFACT, indent=2))
    return mine / "pessimistic.json"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- planning: both forms, every refusal names the study's own field, nothing loads ------------------------


def test_both_traits_forms_plan_the_same(user_files):
    bare = plan_traits([str(user_files), "kindness"])
    entries = plan_traits([StudyTrait(str(user_files), generate=True), StudyTrait("kindness")])
    assert bare == entries
    artifact, items = bare
    assert (artifact.key, artifact.generate, artifact.pairs, artifact.user_artifact) == (
        "pessimistic",
        True,
        None,
        True,
    )
    assert items.key == "kindness" and items.pairs.name == "kindness.json" and not items.generate
    assert items.held_out


def test_a_misspelt_trait_is_refused_with_the_study_field_and_a_suggestion(user_files):
    (user_files.parent.parent / "datasets" / "pairs" / "evil.jsonl").write_text(
        json.dumps({"prompt": "p", "positive": "a", "negative": "b"}) + "\n"
    )
    with pytest.raises(PersonaError) as error:
        plan_traits(["kindness", {"name": "evill"} and StudyTrait("evill")])
    message = str(error.value)
    assert message.startswith(
        "traits[1].name: 'evill' is neither a shipped trait nor a file. did you mean 'evil'?"
    )
    assert "--pairs_path" not in message


def test_a_broken_pairs_file_is_named_by_field_file_and_line(user_files, tmp_path):
    pairs = write_jsonl(
        tmp_path / "gloomy.jsonl",
        [{"prompt": "a", "positive": "b", "negative": "c"}] * 2 + [{"prompt": "a", "positive": "b"}],
    )
    with pytest.raises(ValueError, match=rf"traits\[1\]\.pairs: {pairs}:3: field 'negative' must be"):
        plan_traits(["kindness", StudyTrait("gloomy", pairs=str(pairs))])


def test_a_file_of_no_trait_format_is_refused_naming_each_format(tmp_path):
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "hello"}])
    with pytest.raises(
        PersonaError, match=r"traits\[0\]\.name: .* is not a trait file .*eval_prompt.*positive"
    ):
        plan_traits([str(path)])


def test_an_unreachable_judge_is_found_before_any_model_loads(user_files, tmp_path, monkeypatch):
    import persona.models
    import persona.models.loading

    monkeypatch.setattr(persona.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(
        persona.models.loading, "load_model", lambda *a, **k: pytest.fail("model loaded")
    )  # load_model_and_tokenizer's
    with socket.socket() as free:  # a port nobody listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = tmp_path / "study.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "smollm2-135m",
                "traits": [str(user_files), "kindness"],
                "judge": {"model": "judge-model", "base_url": f"http://127.0.0.1:{port}/v1"},
                "run_dir": str(tmp_path / "run"),
            }
        )
    )
    start = time.perf_counter()
    assert main(["study", "-c", str(config)]) == 1
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run").exists()


def test_a_served_judge_refusing_the_connection_names_judge_base_url(capsys):
    from persona.judges import check_served_judge

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(
        PersonaError, match=rf"^judge\.base_url=http://127\.0\.0\.1:{port}/v1: no judge answers"
    ):
        check_served_judge("m", f"http://127.0.0.1:{port}/v1", url_field="judge.base_url")


# ---- inputs laid out for the phases ----------------------------------------------------------------------------


def test_one_question_set_is_split_and_both_sets_are_kept(user_files, tmp_path):
    from persona.data.traits import load_trait

    plan, notes = prepare_inputs(plan_traits([str(user_files)])[0], tmp_path / "inputs")
    assert load_trait(plan.artifact, "extract").questions == tuple(QUESTIONS[0::2])
    assert load_trait(plan.artifact, "eval").questions == tuple(QUESTIONS[1::2])
    assert load_trait(plan.artifact, "eval").name == "pessimistic"
    assert "split by the study, 3 for extraction" in notes["questions"]

    user_files.write_text(json.dumps({**ARTIFACT, "eval_questions": ["Held out?"]}))
    plan, notes = prepare_inputs(plan_traits([str(user_files)])[0], tmp_path / "inputs")
    assert load_trait(plan.artifact, "extract").questions == tuple(QUESTIONS)
    assert load_trait(plan.artifact, "eval").questions == ("Held out?",)
    assert "its own sets" in notes["questions"]


def test_split_less_pairs_get_a_held_out_split_that_keeps_prompts_together(tmp_path):
    from persona.data.examples import read_pair_records

    records = [{"prompt": f"q{i // 2}", "positive": "a", "negative": "b"} for i in range(20)]
    source = write_jsonl(tmp_path / "gloomy.jsonl", records)
    plan, notes = prepare_inputs(plan_traits([str(source)])[0], tmp_path / "inputs")
    split = read_pair_records(plan.pairs)
    held = {r["prompt"] for r in split if r["split"] == "test"}
    assert held == {"q4", "q9"} and len(split) == 20
    assert all(r["split"] == "train" for r in split if r["prompt"] not in held)
    assert "held out every 5th prompt (2 of 10)" in notes["held_out"]
    mtime = plan.pairs.stat().st_mtime_ns
    prepare_inputs(plan_traits([str(source)])[0], tmp_path / "inputs")
    assert plan.pairs.stat().st_mtime_ns == mtime  # unchanged input: the phases reading it are reused


def test_pairs_with_splits_but_no_test_split_are_in_sample(tmp_path):
    source = write_jsonl(
        tmp_path / "gloomy.jsonl", [{"prompt": "q", "positive": "a", "negative": "b", "split": "train"}]
    )
    plan, notes = prepare_inputs(plan_traits([str(source)])[0], tmp_path / "inputs")
    assert not plan.held_out and "no 'test'" in notes["held_out"]


# ---- whole studies through the CLI, on a tiny model with a served judge ------------------------------------------


def study_config(
    tmp_path: Path, model: str, traits: list, base_url: str, run: Path, n_per_question: int = 1, **phases
) -> Path:
    config = {
        "model": model,
        "traits": traits,
        "judge": {"model": "judge-model", "base_url": base_url, "timeout": 5, "concurrency": 2},
        "phases": {"generations": False, "finetune": False, "export": False, **phases},
        "hardware": {"accelerator": "cpu"},
        "sizes": {"batch_size": 4, "coefs": [-1.0, 0.0, 1.0], "max_new_tokens": 4, "questions": 2,
                  "judged_questions": 2, "n_per_question": n_per_question},
        "run_dir": str(run),
        "title": "user traits",
    }  # fmt: skip
    path = tmp_path / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_study_of_a_user_artifact_file_and_a_personality_trait_runs_to_a_report(
    user_files, tiny_model_dirs, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-study")
    run = tmp_path / "bare"
    pos_done = run / "generated_pessimistic" / "pessimistic_pos.csv"  # written once the pos side is judged

    def scorer(prompt: str) -> dict[str, float]:  # coherent answers; the pos side's show the trait
        return {"90": 1.0} if "coherence" in prompt or not pos_done.exists() else {"10": 1.0}

    with FakeChatServer() as judge:
        judge.scorer = scorer
        # Sampled answers (2 per question and instruction): the tiny model's greedy ones are alike on both sides.
        config = study_config(
            tmp_path,
            tiny_model_dirs["llama"],
            [str(user_files), "kindness"],
            judge.base_url,
            run,
            n_per_question=2,
        )
        assert main(["study", "-c", str(config)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert set(results["traits"]) == {"pessimistic", "kindness"} and results["missed"] == {}
    pessimistic = results["traits"]["pessimistic"]
    assert pessimistic["generated"]["filtered"] and "layers" in pessimistic
    assert "split by the study" in pessimistic["inputs"]["questions"]
    questions = set(pd.read_csv(run / "generated_pessimistic" / "pessimistic_pos.csv")["question"])
    assert questions <= set(QUESTIONS[0::2])  # extraction used the extraction half only
    assert results["traits"]["kindness"]["sweep"]["pairs"] == "held-out"
    report = (run / "report.md").read_text()
    assert "## pessimistic" in report and "*Questions:*" in report and "## Missed" not in report


def test_one_traits_missed_phases_never_stop_the_others_and_exit_4(
    user_files, tiny_model_dirs, tmp_path, monkeypatch, capsys
):
    """A judge that scores nothing: the pessimistic trait's filter keeps no pair (its vectors come unfiltered,
    labelled so, and its layer metrics read the same unfiltered answers) and its judged sweep has no score;
    kindness runs whole; the report and results say what was missed; the exit status is 4."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-study")
    run = tmp_path / "entries"
    traits = [{"name": str(user_files), "generate": True}, {"name": "kindness"}]
    with FakeChatServer() as judge:
        judge.scorer = lambda prompt: {"REFUSAL": 1.0}
        config = study_config(
            tmp_path, tiny_model_dirs["llama"], traits, judge.base_url, run, judged_sweep=True
        )
        assert main(["study", "-c", str(config)]) == 4
    assert "missed phase(s)" in capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert set(results["missed"]) == {"filtered_vectors_pessimistic", "judged_sweep_pessimistic"}
    pessimistic, kindness = results["traits"]["pessimistic"], results["traits"]["kindness"]
    assert pessimistic["layers"]["examples"].endswith("unfiltered (the filter kept no pair)")
    assert {"vectors", "layers", "sweep"} <= set(kindness)
    report = (run / "report.md").read_text()
    assert "## Missed" in report and "judged_sweep_pessimistic" in report
    assert "| missed" in report  # the targets table


@pytest.mark.parametrize(
    "generated, no_filter, label",
    [
        ({"filtered": True, "threshold": 60}, False, "filtered as for extraction"),
        ({"filtered": False, "threshold": 50}, True, "unfiltered (the filter kept no pair)"),
        ({"filtered": False, "threshold": None}, True, "unfiltered (no filter asked)"),
    ],
)
def test_route_only_layer_metrics_read_the_answers_as_extraction_used_them(generated, no_filter, label):
    from persona.study.run import layer_inputs
    from persona.study.traits import TraitPlan

    plan = TraitPlan("gloomy", "traits[0]", None, "gloomy.json", True, True)
    inputs, text = layer_inputs(plan, {**generated, "pos_csv": "p.csv", "neg_csv": "n.csv"}, None)
    assert inputs["no_filter"] is no_filter and text.endswith(label)
    assert inputs.get("threshold") == (60 if not no_filter else None)


def test_the_personality_arm_compares_the_vector_in_the_base_and_the_fine_tuned_model(
    tiny_model_dirs, tmp_path, monkeypatch
):
    from persona.study.checks import check_personality_arm
    from persona.study.config import Hardware, Sizes
    from persona.study.personality_arm import personality_arm_phase

    datasets = write_datasets(tmp_path / "datasets")
    monkeypatch.setenv("PERSONA_DATASETS", str(datasets))
    model = tiny_model_dirs["llama"]
    with pytest.raises(
        PersonaError, match="personality_arm: .*kindness.* Fix: a personality trait with TRAIT items and eval"
    ):
        check_personality_arm(model, "kindness")  # no eval questions for the monitor yet
    (datasets / "traits" / "eval" / "kindness.json").write_text(json.dumps(ARTIFACT))
    check_personality_arm(model, "kindness")
    sizes = Sizes(finetune_samples=8, finetune_epochs=1, batch_size=4)
    arm = personality_arm_phase(
        tmp_path / "arm", model=model, trait="kindness", sizes=sizes, hardware=Hardware(accelerator="cpu")
    )
    assert arm["conversations"] == 8 and [row["model"] for row in arm["quality"]] == [
        "base model",
        "fine-tuned",
    ]
    shift = pd.read_csv(arm["shift_csv"])
    base_alone = pd.read_csv(tmp_path / "arm" / "base" / "layer_metrics.csv")
    pd.testing.assert_series_equal(shift["auc_base"], base_alone["auc"], check_names=False)
    conversation = json.loads((tmp_path / "arm" / "data" / "mix_1.jsonl").read_text().splitlines()[0])
    assert conversation["messages"][-1]["content"] in ("I help.", "I care.")  # high-trait answers only
