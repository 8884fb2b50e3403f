"""``report.md`` of one study run: tables as CSV, figures as PNG (the comparison of runs is in compare.py).

Reads only the run directory (``settings.json``, ``steering.csv``, ``vectors.json``, ``answers.jsonl``,
``grades.jsonl``, ``failures.jsonl``), so ``persona education --action report`` needs no model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from persona.education.data import load_sets  # noqa: E402
from persona.education.figures import (  # noqa: E402
    order_types,
    plot_distributions,
    plot_effects,
    plot_grader_metrics,
    plot_heatmap,
    plot_length,
)
from persona.education.metrics import (  # noqa: E402
    UNSTEERED,
    grader_metrics,
    grader_shifts,
    pearson,
    student_effects,
    with_normalised,
)
from persona.report import markdown_table  # noqa: E402
from persona.store import (
    read_journal,  # noqa: E402
    write_csv,  # noqa: E402
    write_text,
)

EXAMPLE_CHARS = 280


@dataclass
class Results:
    run_dir: Path
    settings: dict
    sets: dict
    answers: pd.DataFrame
    grades: pd.DataFrame
    failures: pd.DataFrame
    steering: pd.DataFrame


def frame(path: Path, columns: list[str]) -> pd.DataFrame:
    rows = read_journal(path)[0]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)


def load_results(run_dir: str | Path) -> Results:
    run_dir = Path(run_dir)
    settings_path = run_dir / "settings.json"
    if not settings_path.is_file():
        raise FileNotFoundError(
            f"{settings_path} not found: {run_dir} is not a `persona education` run directory. "
            "Fix: pass the --run_dir of a study run."
        )
    settings = json.loads(settings_path.read_text())
    grade_columns = [
        "experiment",
        "type",
        "grader",
        "set",
        "sample",
        "expected",
        "score",
        "mass",
        "method",
        "error",
        "words",
        "human1",
        "human2",
    ]
    grades = frame(run_dir / "grades.jsonl", grade_columns)
    for column in ("expected", "score", "mass", "human1", "human2"):
        if column in grades:
            grades[column] = pd.to_numeric(grades[column], errors="coerce")
    steering_path = run_dir / "steering.csv"
    return Results(
        run_dir=run_dir,
        settings=settings,
        sets=load_sets(settings["sets_path"]),
        answers=frame(
            run_dir / "answers.jsonl", ["type", "trait", "sign", "set", "sample", "answer", "words"]
        ),
        grades=grades,
        failures=frame(run_dir / "failures.jsonl", grade_columns + ["attempt"]),
        steering=pd.read_csv(steering_path) if steering_path.is_file() else pd.DataFrame(),
    )


def human_column(grades: pd.DataFrame, reference: str) -> pd.Series:
    if reference == "mean":
        return grades[["human1", "human2"]].mean(axis=1, skipna=True)
    return grades["human1"]


def missing_table(results: Results) -> pd.DataFrame:
    """Per (experiment, grader): grades stored without a score (by reason) and calls that failed for good."""
    grades, failures = results.grades, results.failures
    rows = []
    stored = grades[grades["expected"].isna()] if len(grades) else grades
    for (experiment, grader), part in stored.groupby(["experiment", "grader"]):
        for method, count in part["method"].value_counts().items():
            rows.append({"experiment": experiment, "grader": grader, "reason": method, "count": int(count)})
    if len(failures):
        keys = ["experiment", "type", "grader", "set", "sample"]
        graded = set(map(tuple, grades[keys].astype(str).to_numpy())) if len(grades) else set()
        last = failures.drop_duplicates(keys, keep="last")
        still = last[[tuple(r) not in graded for r in last[keys].astype(str).to_numpy()]]
        for (experiment, grader), part in still.groupby(["experiment", "grader"]):
            error = str(part["error"].dropna().iloc[0]) if part["error"].notna().any() else ""
            rows.append(
                {
                    "experiment": experiment,
                    "grader": grader,
                    "reason": f"failed: {error}"[:160],
                    "count": len(part),
                }
            )
    return pd.DataFrame(rows, columns=["experiment", "grader", "reason", "count"])


def examples_table(results: Results, a_scores: pd.DataFrame) -> pd.DataFrame:
    if results.answers.empty:
        return pd.DataFrame(columns=["type", "set", "sample", "score", "answer"])
    answers = results.answers.copy()
    scores = (
        a_scores.set_index(["type", "set", "sample"])["expected"] if len(a_scores) else pd.Series(dtype=float)
    )
    rows = []
    for student in order_types(answers["type"]):
        row = answers[answers["type"] == student].sort_values(["set", "sample"]).iloc[0]
        score = scores.get((student, row["set"], row["sample"]), math.nan)
        text = str(row["answer"]).replace("\n", " ").replace("|", "/")
        rows.append(
            {
                "type": student,
                "set": int(row["set"]),
                "sample": int(row["sample"]),
                "score": score,
                "answer": text[:EXAMPLE_CHARS] + ("…" if len(text) > EXAMPLE_CHARS else ""),
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ report


def write_report(run_dir: str | Path) -> Path:
    results = load_results(run_dir)
    run, settings, sets = results.run_dir, results.settings, results.sets
    n_boot, seed = settings.get("n_bootstrap", 1000), settings.get("seed", 0)
    grades = results.grades
    a_grades = grades[grades["experiment"] == "A"] if len(grades) else grades
    b_grades = grades[grades["experiment"] == "B"].copy() if len(grades) else grades
    figures, tables = run / "figures", run / "tables"
    figures.mkdir(exist_ok=True)
    tables.mkdir(exist_ok=True)

    effects = student_effects(a_grades, sets, n_boot, seed)
    write_csv(tables / "effects.csv", effects)
    a_scores = with_normalised(a_grades, sets) if len(a_grades) else a_grades.assign(normalised=[])
    a_unsteered = a_scores[a_scores["grader"] == UNSTEERED] if len(a_scores) else a_scores
    heat = (
        a_scores.pivot_table(index="type", columns="grader", values="normalised", aggfunc="mean")
        if len(a_scores)
        else pd.DataFrame()
    )
    if len(heat):
        heat = heat.loc[order_types(heat.index), order_types(heat.columns)]
    write_csv(tables / "student_grader_heatmap.csv", heat.reset_index())
    lengths = pd.DataFrame(
        [
            {
                "type": t,
                "n": len(p),
                "mean_words": p["words"].mean(),
                "pearson_r_words_score": pearson(p["words"], p["normalised"]),
            }
            for t, p in a_unsteered.dropna(subset=["normalised"]).groupby("type")
        ]
    )
    write_csv(tables / "length_vs_score.csv", lengths)
    write_csv(
        tables / "length_vs_score_points.csv",
        a_unsteered[["type", "set", "sample", "words", "normalised"]] if len(a_unsteered) else pd.DataFrame(),
    )

    if len(b_grades):
        b_grades["human"] = human_column(b_grades, settings.get("human_reference", "score1"))
    metrics = grader_metrics(b_grades, sets) if len(b_grades) else pd.DataFrame(columns=["grader", "set"])
    shifts = (
        grader_shifts(b_grades, sets, n_boot, seed) if len(b_grades) else grader_shifts(pd.DataFrame(), sets)
    )
    write_csv(tables / "grader_metrics.csv", metrics)
    write_csv(tables / "grader_shifts.csv", shifts)
    counts = []
    if len(b_grades):
        humans = b_grades.drop_duplicates(["set", "sample"])
        for who, scores in [("human", np.floor(humans["human"] + 0.5))] + [
            (g, p["score"].dropna()) for g, p in b_grades.groupby("grader")
        ]:
            for score, count in scores.astype(int).value_counts().items():
                counts.append(
                    {"who": who, "score": int(score), "count": int(count), "share": count / len(scores)}
                )
    a_counts = (
        a_unsteered.dropna(subset=["score"])
        .groupby(["type", "score"])
        .size()
        .rename("count")
        .reset_index()
        .assign(experiment="A")
        if len(a_unsteered)
        else pd.DataFrame()
    )
    write_csv(
        tables / "score_distributions.csv",
        pd.concat(
            [a_counts.rename(columns={"type": "who"}), pd.DataFrame(counts).assign(experiment="B")],
            ignore_index=True,
        ),
    )
    missing = missing_table(results)
    write_csv(tables / "missing_grades.csv", missing)
    examples = examples_table(results, a_unsteered)
    write_csv(tables / "examples.csv", examples)

    made = {}
    if len(effects) and (effects["type"] != UNSTEERED).any():
        plot_effects(effects, figures / "effects.png")
        made["effects"] = "figures/effects.png"
    plot_distributions(a_unsteered, pd.DataFrame(counts), figures / "score_distributions.png")
    made["distributions"] = "figures/score_distributions.png"
    pooled = metrics[metrics["set"] == "pooled"] if len(metrics) else metrics
    if len(pooled):
        plot_grader_metrics(shifts, pooled, figures / "grader_qwk_bias.png")
        made["graders"] = "figures/grader_qwk_bias.png"
    if len(heat):
        plot_heatmap(heat, figures / "student_grader_heatmap.png")
        made["heatmap"] = "figures/student_grader_heatmap.png"
    plot_length(a_unsteered.dropna(subset=["normalised"]), figures / "length_vs_score.png")
    made["length"] = "figures/length_vs_score.png"

    text = render(results, effects, metrics, shifts, missing, examples, lengths, made)
    path = run / "report.md"
    write_text(path, text)
    print(f"report: {path}")
    return path


def _fmt_ci(value, low, high) -> str:
    if not math.isfinite(value):
        return "—"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:+.3f}"
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def render(results: Results, effects, metrics, shifts, missing, examples, lengths, made: dict) -> str:
    s = results.settings
    info = s.get("model_info", {})
    reference = {
        "score1": "Score1 (the official score)",
        "mean": "the mean of Score1 and Score2 (rounded half up for QWK and exact agreement)",
    }
    lines = [
        "# ASAP-SAS study: persona-steered students and graders",
        "",
        f"Model `{s['model']}`, steering layer **{info.get('layer')}** of {info.get('num_layers')} "
        f"(mean residual norm there {info.get('residual_norm', math.nan):.1f}); seed {s.get('seed')}; "
        f"answers from `{s['data_file']}`; human reference: {reference[s.get('human_reference', 'score1')]}.",
        "",
    ]
    if s.get("synthetic_data"):
        lines += [
            "> **Synthetic sample data.** The answers and human scores of experiment B come from the small "
            "sample we wrote (`datasets/asap_sas/sample/`), not from ASAP-SAS: the numbers below test the "
            "pipeline and mean nothing about real graders. See `datasets/asap_sas/sample/README.md` for "
            "the real data.",
            "",
        ]
    if s.get("test"):
        lines += ["> `--test` run: 2 traits × 2 sets × 1 sample; too small for any conclusion.", ""]
    if not s.get("graders", {}).get("include_source", True):
        lines += [
            "> Grader prompts left out the reading passage / procedure (`graders.include_source: false`).",
            "",
        ]
    lines += [
        "Scores are read from the grader's probabilities of the allowed whole numbers (min..max): the expected "
        "score (kept raw for bias and correlation) and its rounding (for QWK, MAE, agreement). A grade is "
        f"missing — never the minimum — when less than {s.get('min_mass')} of the probability sits on the allowed "
        "scores, when the grader refuses, or when the call fails.",
        "",
        "## Persona vectors and coefficients",
        "",
        "Students are steered at `response` positions; steered graders at every position of their one scoring "
        "forward. *relative* = the push's norm divided by the mean residual norm at the layer, comparable "
        "across models.",
        "",
    ]
    if len(results.steering):
        lines += [markdown_table(results.steering), "", "Table: [`steering.csv`](steering.csv)", ""]
    lines += ["## Experiment A: steered students", ""]
    if len(effects):
        shown = effects.assign(
            effect_ci=[
                _fmt_ci(e, lo, hi)
                for e, lo, hi in zip(effects["effect"], effects["ci_low"], effects["ci_high"], strict=True)
            ]
        )
        lines += [
            "Effect of a student type = its mean normalised score (0–1 within each set's range) minus the "
            "unsteered student's, under the same grader, over the (set, sample) items both answered; "
            "95% paired bootstrap CI.",
            "",
            markdown_table(shown[["grader", "type", "n", "missing", "mean_normalised", "effect_ci"]]),
            "",
            "Table: [`tables/effects.csv`](tables/effects.csv)",
            "",
        ]
    for key, caption in (
        ("effects", "Effect sizes per trait"),
        ("heatmap", "Student × grader: mean normalised score (tables/student_grader_heatmap.csv)"),
        ("distributions", "Score distributions (tables/score_distributions.csv)"),
        ("length", "Answer length vs score (tables/length_vs_score.csv)"),
    ):
        if key in made:
            lines += [f"![{caption}]({made[key]})", "", f"*{caption}.*", ""]
    if len(lengths):
        lines += [markdown_table(lengths), ""]
    if len(examples):
        lines += [
            "### One answer per student type",
            "",
            markdown_table(examples, floatfmt=".2f"),
            "",
            "Table: [`tables/examples.csv`](tables/examples.csv)",
            "",
        ]
    lines += ["## Experiment B: steered graders vs human scores", ""]
    if len(metrics):
        pooled = metrics[metrics["set"] == "pooled"].drop(columns=["set"])
        per_set = metrics[metrics["set"] != "pooled"].pivot(index="grader", columns="set", values="qwk")
        per_set = per_set.reindex(order_types(per_set.index)).reset_index()
        per_set.columns = ["grader"] + [f"QWK set {c}" for c in per_set.columns[1:]]
        lines += [
            "Pooled over sets (QWK with labels over the union of the ranges; `mean_set_qwk` = mean of the "
            "defined per-set values). NaN = undefined (fewer than 2 items, or no variation).",
            "",
            markdown_table(pooled),
            "",
            markdown_table(per_set),
            "",
            "Change vs the unsteered grader on the same answers (95% paired bootstrap CI):",
            "",
            markdown_table(
                shifts.assign(
                    delta_bias_ci=[
                        _fmt_ci(v, lo, hi)
                        for v, lo, hi in zip(
                            shifts["delta_bias"],
                            shifts["delta_bias_ci_low"],
                            shifts["delta_bias_ci_high"],
                            strict=True,
                        )
                    ],
                    delta_qwk_ci=[
                        _fmt_ci(v, lo, hi)
                        for v, lo, hi in zip(
                            shifts["delta_qwk"],
                            shifts["delta_qwk_ci_low"],
                            shifts["delta_qwk_ci_high"],
                            strict=True,
                        )
                    ],
                )[["grader", "n_paired", "bias", "delta_bias_ci", "qwk", "delta_qwk_ci"]]
            ),
            "",
            "Tables: [`tables/grader_metrics.csv`](tables/grader_metrics.csv), "
            "[`tables/grader_shifts.csv`](tables/grader_shifts.csv)",
            "",
        ]
    if "graders" in made:
        lines += [f"![Grader QWK and bias]({made['graders']})", "", "*Grader QWK and bias.*", ""]
    lines += ["## Missing grades", ""]
    lines += (
        [
            markdown_table(missing),
            "",
            "Re-running the same command retries failed calls (`failures.jsonl` keeps every failed attempt).",
            "",
        ]
        if len(missing)
        else ["None.", ""]
    )
    return "\n".join(lines)
