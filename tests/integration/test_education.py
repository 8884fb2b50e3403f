"""`persona education --test` on the embedded SmolLM2-135M: the study end to end, offline, with its report."""

import json
import time

import pytest

from persona.core.store import read_journal

ARGS = [
    "--test",
    "--traits",
    '["evil"]',
    "--accelerator",
    "cpu",
]  # one trait keeps it near a minute on 2 cores


@pytest.mark.integration
@pytest.mark.timeout(300)  # ~1 min alone on 2 cores; generous for a shared machine
def test_education_test_mode_on_the_embedded_model(tmp_path):
    from persona.cli import main

    run_dir = tmp_path / "edu"
    start = time.perf_counter()
    assert main(["education", *ARGS, "--run_dir", str(run_dir)]) == 0
    print(f"persona education --test --traits '[evil]': {time.perf_counter() - start:.0f} s")
    report = (run_dir / "report.md").read_text()
    assert "Experiment A" in report and "Experiment B" in report and "Synthetic sample data" in report
    for figure in (
        "effects",
        "score_distributions",
        "grader_qwk_bias",
        "student_grader_heatmap",
        "length_vs_score",
    ):
        assert (run_dir / "figures" / f"{figure}.png").is_file()
    answers = read_journal(run_dir / "answers.jsonl")[0]
    assert len(answers) == 3 * 2 and all(a["answer"] for a in answers)  # 3 student types x 2 sets x 1 sample
    grades = read_journal(run_dir / "grades.jsonl")[0]
    assert len(grades) == 6 * 3 + 6 * 3  # A: every answer by every grader; B: 3 answers x 2 sets x 3 graders
    scored = [g for g in grades if g["expected"] is not None]
    assert len(scored) >= 0.9 * len(grades) and all(0 <= g["expected"] <= 3 for g in scored)
    assert json.loads((run_dir / "vectors.json").read_text())["evil"]["route"] == "pairs"

    assert main(["education", *ARGS, "--run_dir", str(run_dir)]) == 0  # finished: a re-run only re-reports
    assert len(read_journal(run_dir / "grades.jsonl")[0]) == len(grades)
    assert len(read_journal(run_dir / "answers.jsonl")[0]) == len(answers)
