"""The study end to end on a tiny model: resume after a crash, missing grades, report, CLI and configs."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from persona.core.store import KeyedJournal, read_journal
from persona.education.grading import Grade
from persona.education.settings import GraderSettings, StudentSettings, VectorSettings
from persona.vectors import save_vector, vector_filename

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "education"

SETS = {  # two short sets (one 0-3, one 0-2) keep the tiny model's prompts short
    "1": {
        "set": 1,
        "subject": "Science",
        "topic": "Acid rain",
        "min_score": 0,
        "max_score": 3,
        "source": "Samples soaked in vinegar lost mass.",
        "question": "What else would you need to know?",
        "rubric": {"3": "three details", "2": "two details", "1": "one detail", "0": "none"},
    },
    "3": {
        "set": 3,
        "subject": "English",
        "topic": "Pandas",
        "min_score": 0,
        "max_score": 2,
        "source": "Pandas eat bamboo; pythons eat anything.",
        "question": "How do pandas differ from pythons?",
        "rubric": {"2": "both parts", "1": "one part", "0": "neither"},
    },
}
ROWS = [
    (1, 1, 3, 3, "vinegar amount, type, container size"),
    (2, 1, 1, 2, "how much vinegar"),
    (3, 1, 0, 0, "rocks are cool"),
    (4, 3, 2, 2, "pandas are specialists, pythons generalists"),
    (5, 3, 1, 1, "pandas eat bamboo"),
    (6, 3, 0, 1, "they are animals"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("education_inputs")
    sets_path = tmp_path / "sets.json"
    sets_path.write_text(json.dumps(SETS))
    data = tmp_path / "data"
    data.mkdir()
    lines = ["Id\tEssaySet\tScore1\tScore2\tEssayText"] + ["\t".join(map(str, row)) for row in ROWS]
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    vectors = tmp_path / "vectors"
    generator = torch.Generator().manual_seed(0)
    for trait in ("evil", "optimistic"):
        save_vector(
            torch.randn(4, 32, generator=generator),
            vectors / vector_filename(trait, "response_avg"),
            {"trait": trait},
        )
    return {"sets_path": str(sets_path), "data_dir": str(data), "vector_dir": str(vectors)}


class FakeGrader:
    """Deterministic grades from the prompt's hash; ``fail(prompt, attempt)`` decides which calls fail."""

    def __init__(self, name, fail=None, unscorable_word=None):
        self.name, self.fail, self.unscorable_word, self.attempts = name, fail, unscorable_word, {}

    def grade(self, prompts, ranges):
        grades = []
        for prompt, (low, high) in zip(prompts, ranges, strict=True):
            self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
            if self.fail and self.fail(prompt, self.attempts[prompt]):
                grades.append(Grade(None, None, "failed", error="HTTP 503 (after 3 attempts)"))
            elif self.unscorable_word and self.unscorable_word in prompt:
                grades.append(Grade(None, None, "unscorable", mass=0.01))
            else:
                fraction = int(hashlib.sha256((self.name + prompt).encode()).hexdigest()[:8], 16) / 16**8
                expected = low + fraction * (high - low)
                grades.append(Grade(expected, int(expected + 0.5), "digit_chain", mass=0.9))
        return grades


def fake_factory(**kwargs):
    return lambda study: {name: FakeGrader(name, **kwargs) for name in study.grader_names()}


def run(tiny_model_dirs, inputs, run_dir, grader_factory=None, **overrides):
    from persona.education.cli import run_study

    options = dict(
        model=tiny_model_dirs["llama"],
        test=True,
        run_dir=str(run_dir),
        sets_path=inputs["sets_path"],
        data_dir=inputs["data_dir"],
        vectors=VectorSettings(vector_dir=inputs["vector_dir"]),
        graders=GraderSettings(min_mass=0.0, include_source=False, batch_size=1),
        students=StudentSettings(max_new_tokens=6, batch_size=1),
        n_bootstrap=20,
        accelerator="cpu",
        grader_factory=grader_factory or fake_factory(),
    )
    options.update(overrides)
    return run_study(**options)


@pytest.fixture(scope="module")
def reference(tiny_model_dirs, inputs, tmp_path_factory):
    """One uninterrupted run with the fake graders, shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("education_reference") / "run"
    run(tiny_model_dirs, inputs, run_dir)
    return run_dir


def rows(run_dir, name):
    return read_journal(Path(run_dir) / name)[0]


def keys(records, fields):
    return [tuple(r[f] for f in fields) for r in records]


def test_tiny_end_to_end_with_the_local_grader_writes_the_report(tiny_model_dirs, inputs, tmp_path):
    report = Path(run(tiny_model_dirs, inputs, tmp_path / "run", grader_factory=None))
    run_dir = report.parent
    assert report.is_file() and "Experiment B" in report.read_text()
    for figure in (
        "effects",
        "score_distributions",
        "grader_qwk_bias",
        "student_grader_heatmap",
        "length_vs_score",
    ):
        assert (run_dir / "figures" / f"{figure}.png").stat().st_size > 0
    for table in ("effects", "grader_metrics", "grader_shifts", "student_grader_heatmap", "examples"):
        assert (run_dir / "tables" / f"{table}.csv").is_file()
    grades = rows(run_dir, "grades.jsonl")
    assert len([g for g in grades if g["experiment"] == "A"]) == 5 * 2 * 5  # 5 students x 2 sets x 5 graders
    assert len([g for g in grades if g["experiment"] == "B"]) == 6 * 5  # 3 real answers x 2 sets x 5 graders
    assert all(g["method"] == "digit_chain" and 0 <= g["expected"] <= 3 for g in grades)
    steering = (run_dir / "steering.csv").read_text()
    assert "given" in steering and "student_coef_relative" in steering


def test_resume_after_crashes_loses_and_duplicates_nothing(
    tiny_model_dirs, inputs, reference, tmp_path, monkeypatch
):
    import persona.steering

    crashed = tmp_path / "crashed"
    real_generate = persona.steering.generate_steered
    calls = {"n": 0}

    def crash_on_the_fourth_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(persona.steering, "generate_steered", crash_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dirs, inputs, crashed)
    monkeypatch.setattr(persona.steering, "generate_steered", real_generate)
    assert len(rows(crashed, "answers.jsonl")) == 3

    def crash_while_grading(study):
        graders = fake_factory()(study)

        def boom(prompts, ranges):
            raise KeyboardInterrupt("killed")

        graders["evil-"].grade = boom
        return graders

    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dirs, inputs, crashed, grader_factory=crash_while_grading)
    with (crashed / "grades.jsonl").open("ab") as handle:  # a torn last line, as a kill mid-write leaves
        handle.write(b'{"experiment": "A", "type": "unst')

    run(tiny_model_dirs, inputs, crashed)
    for name, fields in (
        ("answers.jsonl", ("type", "set", "sample")),
        ("grades.jsonl", ("experiment", "type", "grader", "set", "sample")),
    ):
        resumed, whole = rows(crashed, name), rows(reference, name)
        assert len(keys(resumed, fields)) == len(set(keys(resumed, fields)))  # no duplicates
        assert sorted(keys(resumed, fields)) == sorted(keys(whole, fields))  # nothing lost
    texts = {
        tuple(r[f] for f in ("type", "set", "sample")): r["answer"] for r in rows(reference, "answers.jsonl")
    }
    assert all(
        texts[(r["type"], r["set"], r["sample"])] == r["answer"] for r in rows(crashed, "answers.jsonl")
    )


def test_failed_calls_are_retried_then_reported_missing_never_the_minimum(tiny_model_dirs, inputs, tmp_path):
    def flaky(prompt, attempt):  # "pandas eat bamboo": the first attempt fails; "rocks are cool": every one
        return "rocks are cool" in prompt or ("pandas eat bamboo" in prompt and attempt == 1)

    run_dir = tmp_path / "run"
    run(
        tiny_model_dirs,
        inputs,
        run_dir,
        grader_factory=fake_factory(fail=flaky, unscorable_word="they are animals"),
    )
    grades = [g for g in rows(run_dir, "grades.jsonl") if g["experiment"] == "B"]
    stored = {(g["grader"], g["sample"]): g for g in grades}
    assert ("unsteered", 3) not in stored  # failed for good: not stored, retried on the next run
    assert stored[("unsteered", 5)]["expected"] is not None  # failed once, then retried in the same run
    assert stored[("unsteered", 6)]["expected"] is None and stored[("unsteered", 6)]["method"] == "unscorable"
    failures = rows(run_dir, "failures.jsonl")
    assert {f["sample"] for f in failures} == {3, 5}
    missing = (run_dir / "tables" / "missing_grades.csv").read_text()
    assert "unscorable" in missing and "failed: HTTP 503" in missing
    report = (run_dir / "report.md").read_text()
    assert "## Missing grades" in report and "HTTP 503" in report

    run(tiny_model_dirs, inputs, run_dir)  # the next run retries the failed calls only
    after = [g for g in rows(run_dir, "grades.jsonl") if g["experiment"] == "B"]
    assert len(after) == len(grades) + 5  # sample 3 under each of the 5 graders
    assert len(keys(after, ("grader", "sample"))) == len(set(keys(after, ("grader", "sample"))))


def test_a_run_with_other_settings_is_refused(tiny_model_dirs, inputs, reference):
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 there, 1 now\)"):
        run(tiny_model_dirs, inputs, reference, seed=1)


def test_journal_drops_a_torn_tail_before_appending(tmp_path):
    journal = KeyedJournal(tmp_path / "j.jsonl", ("k",))
    journal.append([{"k": 1}, {"k": 2}])
    with journal.path.open("ab") as handle:
        handle.write(b'{"k": 3, "v"')
    fresh = KeyedJournal(journal.path, ("k",))
    assert sorted(fresh.load()) == [(1,), (2,)]
    fresh.append([{"k": 3}, {"k": 1, "dup": True}])
    assert [r["k"] for r in read_journal(journal.path)[0]] == [1, 2, 3, 1]
    assert fresh.load()[(1,)] == {"k": 1}  # the first row of a key wins


def test_cli_report_and_compare(tiny_model_dirs, inputs, reference, tmp_path):
    import shutil

    from persona.cli import main

    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(reference, first)
    run(tiny_model_dirs, inputs, second, seed=3)
    (first / "report.md").unlink()
    assert main(["education", "report", "--run_dir", str(first)]) == 0
    assert (first / "report.md").is_file()
    out = tmp_path / "compare"
    assert main(["education", "compare", "--runs", f"{first},{second}", "--out_dir", str(out)]) == 0
    assert (
        main(
            [
                "education",
                "--action",
                "compare",
                "--runs",
                json.dumps([str(first), str(second)]),
                "--out_dir",
                str(out),
            ]
        )
        == 0
    )
    text = (out / "compare.md").read_text()
    assert "relative" in text and (out / "figures" / "effects_by_run.png").is_file()
    assert (out / "compare_steering.csv").is_file()


def test_unknown_action_and_unknown_trait_fail_before_any_model_loads(tmp_path):
    from persona.education.cli import education

    with pytest.raises(ValueError, match="--action 'plot'"):
        education(action="plot")
    with pytest.raises(Exception, match="nonexistent"):
        education(traits=["nonexistent"], run_dir=str(tmp_path / "r"))


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_against_the_command(config):
    from jsonargparse import ArgumentParser

    from persona.education.cli import education

    parser = ArgumentParser()
    parser.add_function_arguments(education)
    parser.add_argument("--config", action="config")
    parsed = parser.parse_args(["--config", str(config)])
    init = parser.instantiate_classes(parsed)
    assert init.students.n_samples >= 1 and init.model


def test_a_half_finished_run_still_gets_a_report(reference, tmp_path):
    import shutil

    from persona.education.report import write_report

    half = tmp_path / "half"
    shutil.copytree(reference, half)
    (half / "grades.jsonl").unlink()  # killed after the students answered, before any grade
    text = write_report(half).read_text()
    assert "## Experiment A" in text and "## Missing grades" in text
