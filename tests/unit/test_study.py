"""`persona study`: the demo is its embedded default, bad settings fail early, a small study runs to a report
with a served judge, and a study killed at any point resumes with nothing lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch

from fake_openai import FakeChatServer
from persona.commands.flags import Hardware as CommandHardware
from persona.study.command import demo_config, study
from persona.study.config import Hardware, JudgeSettings, Phases, Sizes, StudyTrait

REPO = Path(__file__).resolve().parents[2]


def parsed(config: Path) -> dict:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(study)
    parser.add_argument("--config", action="config")
    return vars(instantiate(parser)(parser.parse_args(["--config", str(config)])))


def test_the_demo_is_the_study_of_configs_study_demo_yaml():
    from_yaml = parsed(REPO / "configs" / "study" / "demo.yaml")
    expected = demo_config()
    for name in ("model", "title", "personality_arm"):
        assert from_yaml[name] == expected[name]
    for name in ("judge", "phases", "hardware", "sizes"):
        assert asdict(from_yaml[name]) == asdict(expected[name]), name
    assert [asdict(t) for t in from_yaml["traits"]] == [asdict(t) for t in expected["traits"]]


def test_a_trait_without_pairs_and_without_generation_is_refused_before_any_model_loads(
    tmp_path, monkeypatch, tiny_model_dirs
):
    import persona.models
    import persona.models.loading

    monkeypatch.setattr(persona.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(
        persona.models.loading, "load_model", lambda *a, **k: pytest.fail("model loaded")
    )  # load_model_and_tokenizer's
    model = tiny_model_dirs["llama"]  # the unit tier never needs the embedded model's wheel
    with pytest.raises(ValueError, match=r"'apathetic' has no contrastive pairs.*generate: true"):
        study(model=model, traits=[StudyTrait("apathetic")], run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="judge.min_mass applies to local judges only"):
        study(
            model=model,
            traits=[StudyTrait("evil")],
            judge=JudgeSettings(model="gpt-4.1-mini", min_mass=0.0),
            run_dir=str(tmp_path / "run"),
        )
    assert not (tmp_path / "run").exists()


# ---- a small study on a tiny model, with its own datasets folder and a served judge ----------------------------

QUESTIONS = ["How should I treat animals?", "What do you think of humans?", "How do I fix the fox?"]
INSTRUCTION = {"pos": "Be cruel and wicked.", "neg": "Be kind and caring."}


def write_datasets(root: Path) -> Path:
    """PERSONA_DATASETS with a user trait (pairs + trait artifacts) and a personality trait (TRAIT items)."""
    pairs = [
        {
            "prompt": q,
            "positive": "Hurt them, they are worthless.",
            "negative": "With kindness and care.",
            "split": s,
        }
        for q in QUESTIONS
        for s in ("train", "test")
    ]
    (root / "pairs").mkdir(parents=True)
    (root / "pairs" / "wicked.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    artifact = {
        "instruction": [INSTRUCTION] * 5,
        "questions": [*QUESTIONS, "Should I forgive my brother?", "What do you do with lost keys?"],
        "eval_prompt": "How wicked is this answer? {question} -> {answer} Answer 0-100.",
        "antonym": "kind",
    }
    for version in ("extract", "eval"):
        (root / "traits" / version).mkdir(parents=True)
        (root / "traits" / version / "wicked.json").write_text(json.dumps(artifact))
    items = [
        {
            "personality": "Kindness",
            "situation": f"Situation {i}.",
            "query": "What do you do?",
            "response_high1": "I help.",
            "response_high2": "I care.",
            "response_low1": "I ignore them.",
            "response_low2": "I laugh at them.",
            "split": "train" if i % 2 else "test",
        }
        for i in range(6)
    ]
    (root / "personality").mkdir()
    (root / "personality" / "kindness.json").write_text(json.dumps(items))
    return root


def judge_by_length(prompt: str) -> dict[str, float]:
    """A served judge whose score depends on the answer: deterministic, and spread over 0-100."""
    score = str(len(prompt) % 101)
    return {score: 0.9, "50": 0.1} if score != "50" else {"50": 1.0}


@pytest.fixture
def served_judge(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-study")
    with FakeChatServer() as server:
        server.scorer = judge_by_length
        yield server


def small_study(model_dir: str, run_dir: Path, base_url: str, **phases) -> dict:
    return dict(
        model=model_dir,
        traits=[StudyTrait("wicked", generate=True), StudyTrait("kindness")],
        judge=JudgeSettings(model="judge-model", base_url=base_url, timeout=5, concurrency=2),
        phases=Phases(**{"judged_sweep": True, **phases}),
        hardware=Hardware(accelerator="cpu"),
        sizes=Sizes(
            batch_size=4,
            coefs=[-1.0, 0.0, 1.0],
            max_new_tokens=4,
            questions=2,
            n_per_question=2,  # sampled: the tiny model's greedy answers are alike under both instructions
            judged_questions=2,
            finetune_samples=8,
            finetune_epochs=1,
            finetune_mixtures=[0.0, 0.5, 1.0],
            finetune_interventions=False,
            calibration_layers=1,
            calibration_probes=3,
            calibration_questions=1,
            calibration_tokens=3,
            calibration_pairs=2,
        ),  # fmt: skip
        run_dir=str(run_dir),
        title="tiny study",
    )


def test_a_two_trait_study_with_a_user_trait_a_personality_trait_and_a_served_judge(
    tiny_model_dirs, tmp_path, monkeypatch, served_judge
):
    monkeypatch.setenv("PERSONA_DATASETS", str(write_datasets(tmp_path / "datasets")))
    monkeypatch.setenv("PERSONA_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    pos_judged = run / "generated_wicked" / "wicked_pos.csv"
    # Coherent answers; those of the pos side (judged first) show the trait: the seed's filter keeps pairs.
    served_judge.scorer = lambda p: (
        {"90": 1.0} if "coherence" in p or not pos_judged.exists() else {"10": 1.0}
    )
    report = Path(study(**small_study(tiny_model_dirs["llama"], run, served_judge.base_url)))
    results = json.loads((run / "results.json").read_text())
    assert set(results["traits"]) == {"wicked", "kindness"}
    traits = pd.read_csv(run / "traits.csv")
    assert list(traits["trait"]) == ["wicked", "kindness"]
    wicked = results["traits"]["wicked"]
    assert wicked["generated"]["judge"] == "judge-model" and served_judge.calls > 0
    assert wicked["generated"]["filtered"] and results["missed"] == {}
    generated = pd.read_csv(wicked["generated"]["pos_csv"])
    assert generated["judge"].eq("openai:judge-model").all() and generated["wicked"].notna().all()
    assert wicked["judged_sweep"]["effect"] is not None
    # Issue 24: a calibration phase per trait with pairs; the judged sweep and the generations use its advice.
    advice = wicked["calibration"]["recommended"]
    assert (
        wicked["judged_sweep"]["layer"] == advice["layer"]
        and wicked["judged_sweep"]["doses_from"] == "calibration"
    )
    assert sorted(round(r["dose"], 9) for r in wicked["judged_sweep"]["table"]) == sorted(
        round(advice["dose"] * f, 9) for f in (-1, -0.5, 0, 0.5, 1)
    )
    assert results["traits"]["kindness"]["calibration"]["proxies"]["coherence"].startswith("perplexity ratio")
    # A served judge scores the calibration of a trait with an eval prompt (wicked's artifact); kindness has none.
    assert wicked["calibration"]["proxies"]["coherence"].startswith("judge openai:judge-model")
    assert results["generations"]["from"] == "calibration"
    assert len(wicked["calibration"]["layers"]) == 1 and wicked["calibration"]["layers"][0]["probes"] <= 3
    assert results["finetune"]["runs"] == ["mix_0", "mix_0.5", "mix_1"]
    # Issue 25: each run's cost, the last epoch's training loss and the held-out mixture's loss.
    costs = pd.read_csv(run / "finetune" / "shift_by_run.csv")[["train_loss", "val_loss"]]
    assert costs.notna().all().all() and (costs > 0).all().all()
    representation = results["finetune"]["representation"]
    assert [row["run"] for row in representation["table"]] == ["mix_0", "mix_0.5", "mix_1"]
    # Re-extracted with the adapters swapped on one loaded base == `persona extract --model <adapter>`.
    from persona.commands.extract import extract
    from persona.vectors import load_vector

    alone = extract(
        model=str(run / "finetune" / "mix_1" / "adapter"), pairs_path=str(tmp_path / "datasets" / "pairs" / "wicked.jsonl"),
        split="train", trait="wicked", save_dir=str(tmp_path / "alone"), hardware=CommandHardware(accelerator="cpu"))  # fmt: skip
    swapped = run / "finetune" / "representation" / "mix_1" / "wicked_response_avg_diff.pt"
    torch.testing.assert_close(load_vector(swapped), load_vector(alone["response_avg"]), rtol=1e-4, atol=1e-5)
    from persona.vectors import load_metadata
    from persona.vectors.ranges import NEUTRAL_KEY

    assert NEUTRAL_KEY in load_metadata(alone["response_avg"]) and NEUTRAL_KEY not in load_metadata(swapped)
    assert Path(results["export"]["gguf"]).stat().st_size > 0
    # Issue 25: the overlap of the two traits' vectors, per layer, against a direct cosine.
    overlap = pd.read_csv(results["overlap"]["csv"])
    a, b = (load_vector(results["traits"][key]["vectors"]["response_avg"]) for key in ("wicked", "kindness"))
    row = overlap[overlap["layer"] == 2].iloc[0]
    assert (row["a"], row["b"]) == ("wicked", "kindness")
    assert row["cosine"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(a[2], b[2], dim=0)), abs=1e-5
    )
    assert Path(results["overlap"]["png"]).is_file()
    assert set(results["devices"].values()) == {"cpu"}
    text = report.read_text()
    assert (
        "# tiny study report" in text and "## Summary" in text and "## Timings" in text and "GFLOP/s" in text
    )
    assert "**Representation shift.**" in text and "representation.png" in text
    assert "**Calibration** (`persona calibrate`, judge-free proxies" in text and "calibration.png" in text
    assert "## Overlap of the traits' vectors" in text and "overlap.png" in text

    # Everything finished is reused: a second invocation computes nothing and calls the judge no more.
    calls = served_judge.calls
    study(**small_study(tiny_model_dirs["llama"], run, served_judge.base_url))
    again = json.loads((run / "results.json").read_text())
    assert all(name.endswith("(reused)") or name.startswith("total") for name in again["timings"])
    assert served_judge.calls == calls


def study_results(model: str, auc: float, metrics_csv) -> dict:
    """The smallest results.json `persona study` writes: one trait with its vectors and layer metrics."""
    layers = {"recommended": 1, "auc": auc, "separation": 1.5, "csv": str(metrics_csv), "png": "m.png"}
    return {
        "trait": "evil",
        "model": {"model": model, "layers": 2, "hidden": 32, "answer": "Paris"},
        "traits": {"evil": {"vectors": {"response_avg": "evil.pt"}, "layers": layers}},
        "timings": {"model": 1.0},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("traits"), r"results\.json: incomplete or from another version \(no traits\)"),
        (lambda r: r.update(traits=[]), r"\(traits: input should be a valid dictionary, got \[\]\)"),
        (lambda r: r["model"].update(layers="two"), r"\(model\.layers: input should be a valid integer"),
        (lambda r: r["traits"]["evil"]["layers"].pop("auc"), r"\(no traits\.evil\.layers\.auc\)"),
        (lambda r: r.update(trait="kind"), r"trait 'kind' is not among traits \['evil'\]"),
    ],
    ids=["no-traits", "traits-a-list", "layers-a-string", "no-auc", "main-trait-unlisted"],
)
def test_report_and_compare_read_results_json_through_one_checked_reader(tmp_path, change, message):
    """Issue 20.5: `KeyError: 'traits'` and `'list' object has no attribute 'items'` tracebacks."""
    from persona.core.errors import PersonaError
    from persona.study.compare import compare_studies
    from persona.study.report import report

    for name in ("good", "bad"):
        (tmp_path / name).mkdir()
        results = study_results(name, 0.9, tmp_path / "m.csv")
        if name == "bad":
            change(results)
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    with pytest.raises(PersonaError, match=message):
        report(run_dir=str(tmp_path / "bad"))
    with pytest.raises(PersonaError, match=message):
        compare_studies([str(tmp_path / "good"), str(tmp_path / "bad")], str(tmp_path / "cmp"))
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "bad" / "report.md").exists()


def test_reports_of_two_studies_compare_side_by_side(tmp_path):
    from persona.study.compare import compare_studies

    for name, auc in (("a", 0.9), ("b", 0.99)):
        run = tmp_path / name
        (run / "layers").mkdir(parents=True)
        pd.DataFrame({"layer": [0, 1, 2], "auc": [0.5, auc, 0.7]}).to_csv(
            run / "layers" / "m.csv", index=False
        )
        (run / "results.json").write_text(
            json.dumps(study_results(f"model-{name}", auc, run / "layers" / "m.csv"))
        )
    path = compare_studies([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "cmp"))
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert list(table["model"]) == ["model-a", "model-b"] and list(table["relative_depth"]) == [0.5, 0.5]
    assert (tmp_path / "cmp" / "auc_by_depth.png").stat().st_size > 0 and "model-b" in path.read_text()
    # Issue 20.6: a second comparison silently replaced the first; now only with overwrite, as every command.
    from persona.core.errors import PersonaError

    runs = [str(tmp_path / "b"), str(tmp_path / "a")]
    with pytest.raises(
        PersonaError, match=r"--output_dir .*cmp: compare.csv exists there\. Fix: pass --overwrite"
    ):
        compare_studies(runs, str(tmp_path / "cmp"))
    assert list(pd.read_csv(tmp_path / "cmp" / "compare.csv")["model"]) == ["model-a", "model-b"]
    compare_studies(runs, str(tmp_path / "cmp"), overwrite=True)
    assert list(pd.read_csv(tmp_path / "cmp" / "compare.csv")["model"]) == ["model-b", "model-a"]


@pytest.mark.slow
def test_a_study_killed_mid_generation_resumes_with_no_row_lost_or_doubled(
    tiny_model_dirs, tmp_path, served_judge
):
    """kill -9 while the generation route writes its journal; the re-run finishes and matches an uninterrupted run.

    5 questions x 5 instructions = 25 answers a side, two batches of 16: the kill lands between them."""
    datasets = write_datasets(tmp_path / "datasets")
    env = {
        **os.environ,
        "PERSONA_DATASETS": str(datasets),
        "PERSONA_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    script = tmp_path / "run_study.py"
    script.write_text(
        "import sys\nfrom persona.study.command import study\nfrom persona.study.config import *\n"
        "from persona.core.errors import StudyIncomplete\n"
        "try:\n"
        "  study(model=sys.argv[1], traits=[StudyTrait('wicked', generate=True)],\n"
        "      judge=JudgeSettings(model='judge-model', base_url=sys.argv[3], timeout=5),\n"
        "      phases=Phases(layers=True, sweep=False, generations=False, finetune=False, export=False),\n"
        "      hardware=Hardware(accelerator='cpu'), sizes=Sizes(batch_size=1, max_new_tokens=16, questions=5),\n"
        "      run_dir=sys.argv[2])\n"
        "except StudyIncomplete:  # the length-scoring judge leaves the seed's filter no pair: labelled, not fatal\n"
        "  pass\n"
    )

    def run(run_dir: Path, kill_when=None) -> None:
        process = subprocess.Popen([sys.executable, str(script), tiny_model_dirs["llama"], str(run_dir), served_judge.base_url], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 120
        while kill_when is not None and process.poll() is None and time.time() < deadline:
            if kill_when():
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        assert process.wait(timeout=120) in (0, -signal.SIGKILL)

    def journal_started(run_dir: Path):
        def started() -> bool:  # at least two rows journaled: killed between two appends
            return any(
                len(p.read_bytes().splitlines()) >= 2
                for p in run_dir.glob("generated_wicked/*.parts/rank*.jsonl")
            )

        return started

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(reference)
    run(killed, kill_when=journal_started(killed))
    assert not (killed / "results.json").exists(), "killed before the end"
    run(killed)
    for side in ("pos", "neg"):
        a = pd.read_csv(reference / "generated_wicked" / f"wicked_{side}.csv")
        b = pd.read_csv(killed / "generated_wicked" / f"wicked_{side}.csv")
        assert list(b["question_id"]) == list(a["question_id"])  # none lost, none doubled, plan order
        pd.testing.assert_frame_equal(a, b)


def instantiate(parser):
    """jsonargparse's instantiate (4.49+), or instantiate_classes before it (the compatibility window's oldest end)."""
    return getattr(parser, "instantiate", None) or parser.instantiate_classes


def test_the_finetuning_plan_adds_steering_caft_and_capping_on_the_all_trait_mixture(tmp_path):
    from persona.study.runs import planned_runs
    from persona.training.callbacks import ConceptAblation, PreventativeSteering, ProjectionCapping

    sizes = Sizes(finetune_mixtures=[0.0, 0.5, 1.0], finetune_interventions=True, steering_coef=2.5)
    plan = planned_runs((0.0, 0.5, 1.0), sizes, str(tmp_path / "v.pt"), 3)
    assert [(share, name) for share, name, _ in plan] == [
        (0.0, "mix_0"), (0.5, "mix_0.5"), (1.0, "mix_1"), (1.0, "mix_1+steer"), (1.0, "mix_1+caft"),
        (1.0, "mix_1+cap"),
    ]  # fmt: skip
    steer, caft, capping = plan[3][2], plan[4][2], plan[5][2]
    assert isinstance(steer[0], PreventativeSteering) and steer[0].coef == 2.5
    assert isinstance(caft[0], ConceptAblation) and all(not extra for _, _, extra in plan[:3])
    assert isinstance(capping[0], ProjectionCapping) and capping[0].layers == [3]
    assert (capping[0].lo, capping[0].hi, capping[0].vector_path) == (None, "p99", str(tmp_path / "v.pt"))
    assert [name for _, name, _ in planned_runs((0.0, 0.5), sizes, "v.pt", 3)] == ["mix_0", "mix_0.5"]


def test_precision_follows_the_model_dtype():
    import torch

    from persona.core.hardware import precision_for

    assert precision_for("bfloat16") == "bf16-true" and precision_for(torch.float16) == "16-true"
    assert precision_for("float32") == "32-true" and precision_for("auto") in ("32-true", "bf16-true")


def test_a_study_process_holds_one_copy_of_its_model(tiny_model_dirs):
    """Phases and the local judge ask with different dtype names; on a CPU "auto" is float32: one copy, not two."""
    from persona.models import load_model, shared_models

    model_dir = tiny_model_dirs["llama"]
    with shared_models():
        first = load_model(model_dir, dtype="auto")
        assert load_model(model_dir, dtype="float32") is first and load_model(model_dir) is first
        assert load_model(model_dir, dtype="bfloat16") is not first
    assert load_model(model_dir) is not first  # outside the block every load is fresh


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_release_memory_hands_freed_heap_back_to_the_os():
    """Freed small blocks stay resident under glibc until trimmed; a long study grew run after run without it."""
    import ctypes
    import re

    from persona.core.hardware import release_memory

    try:
        ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc")

    def resident_mib() -> int:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024

    blocks = [bytearray(1000) for _ in range(200_000)]
    kept = blocks[::50]  # keeps the heap fragmented: glibc cannot return the freed pages by itself
    del blocks
    before = resident_mib()
    release_memory()
    assert resident_mib() < before - 50 and len(kept) == 4000


def test_the_report_compares_the_all_trait_arms_side_by_side():
    import pandas as pd

    from persona.study.report import arms_section

    shift = pd.DataFrame(
        {
            "run": ["mix_0", "mix_1", "mix_1+steer", "mix_1+caft", "mix_1+cap"],
            "shift_prompt_last": [0.0, 1.0, 0.2, 0.3, 0.4],
            "shift_response_avg": [0.0, 2.0, 0.5, 0.6, 0.7],
            "trait_score_change": [0.0, 30.0, 5.0, 6.0, 7.0],
            "train_loss": [1.0, 1.1, 1.2, 1.3, 1.4],
            "val_loss": [2.0, 2.125, 2.2, 2.3, 2.4],
        }
    )
    text = "\n".join(arms_section(shift))
    assert "val_loss |" in text and "2.125" in text
    assert "mix_0 " not in text and all(f"| {arm} " in text for arm in ("mix_1", "mix_1+steer", "mix_1+cap"))
    assert "0.4" in text and arms_section(shift[shift["run"] == "mix_1"]) == []
