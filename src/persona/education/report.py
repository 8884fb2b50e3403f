"""``report.md`` of one study run: tables as CSV, figures as PNG (the comparison of runs is in compare.py).

Reads only the run directory (``settings.json``, ``steering.csv``, ``vectors.json``, ``answers.jsonl``,
``grades.jsonl``, ``failures.jsonl``), so ``persona education --action report`` needs no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from persona.education.results import Results, load_results

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from persona.core.store import (  # noqa: E402
    write_csv,
    write_text,
)
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
from persona.education.report_text import render  # noqa: E402

EXAMPLE_CHARS = 280


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


@dataclass
class ReportTables:
    """What the report shows, computed from a run's results."""

    effects: pd.DataFrame
    a_unsteered: pd.DataFrame  # experiment A's grades by the unsteered grader, with normalised scores
    heat: pd.DataFrame
    lengths: pd.DataFrame
    metrics: pd.DataFrame
    shifts: pd.DataFrame
    b_counts: pd.DataFrame
    distributions: pd.DataFrame
    missing: pd.DataFrame
    examples: pd.DataFrame


def write_report(run_dir: str | Path) -> Path:
    results = load_results(run_dir)
    run = results.run_dir
    (run / "figures").mkdir(exist_ok=True)
    (run / "tables").mkdir(exist_ok=True)
    tables = compute_tables(results)
    write_tables(run / "tables", csv_tables(tables))
    made = draw_figures(tables, run)
    text = render(
        results,
        tables.effects,
        tables.metrics,
        tables.shifts,
        tables.missing,
        tables.examples,
        tables.lengths,
        made,
    )
    path = run / "report.md"
    write_text(path, text)
    print(f"report: {path}")
    return path


def compute_tables(results: Results) -> ReportTables:
    settings, sets, grades = results.settings, results.sets, results.grades
    n_boot, seed = settings.get("n_bootstrap", 1000), settings.get("seed", 0)
    a_grades = grades[grades["experiment"] == "A"] if len(grades) else grades
    effects = student_effects(a_grades, sets, n_boot, seed)
    a_scores = with_normalised(a_grades, sets) if len(a_grades) else a_grades.assign(normalised=[])
    a_unsteered = a_scores[a_scores["grader"] == UNSTEERED] if len(a_scores) else a_scores
    b_grades = experiment_b_grades(grades, settings.get("human_reference", "score1"))
    metrics = grader_metrics(b_grades, sets) if len(b_grades) else pd.DataFrame(columns=["grader", "set"])
    shifts = (
        grader_shifts(b_grades, sets, n_boot, seed) if len(b_grades) else grader_shifts(pd.DataFrame(), sets)
    )
    b_counts = score_counts(b_grades)
    return ReportTables(
        effects=effects,
        a_unsteered=a_unsteered,
        heat=heatmap_table(a_scores),
        lengths=lengths_table(a_unsteered),
        metrics=metrics,
        shifts=shifts,
        b_counts=b_counts,
        distributions=score_distributions_table(a_unsteered, b_counts),
        missing=missing_table(results),
        examples=examples_table(results, a_unsteered),
    )


def experiment_b_grades(grades: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Experiment B's grades with the ``human`` score they are compared with."""
    b_grades = grades[grades["experiment"] == "B"].copy() if len(grades) else grades
    if len(b_grades):
        b_grades["human"] = human_column(b_grades, reference)
    return b_grades


def heatmap_table(a_scores: pd.DataFrame) -> pd.DataFrame:
    """Mean normalised score per student type (rows) and grader (columns)."""
    if not len(a_scores):
        return pd.DataFrame()
    heat = a_scores.pivot_table(index="type", columns="grader", values="normalised", aggfunc="mean")
    if len(heat):
        heat = heat.loc[order_types(heat.index), order_types(heat.columns)]
    return heat


def lengths_table(a_unsteered: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
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


def score_counts(b_grades: pd.DataFrame) -> pd.DataFrame:
    """Experiment B: how often each score was given, by the humans (rounded half up) and by each grader."""
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
    return pd.DataFrame(counts)


def score_distributions_table(a_unsteered: pd.DataFrame, b_counts: pd.DataFrame) -> pd.DataFrame:
    """Score counts of both experiments in one table (A: per student type, unsteered grader; B: per grader)."""
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
    return pd.concat(
        [a_counts.rename(columns={"type": "who"}), b_counts.assign(experiment="B")], ignore_index=True
    )


def csv_tables(tables: ReportTables) -> dict[str, pd.DataFrame]:
    """The CSVs under ``tables/``, by file name without ``.csv``."""
    points = ["type", "set", "sample", "words", "normalised"]
    return {
        "effects": tables.effects,
        "student_grader_heatmap": tables.heat.reset_index(),
        "length_vs_score": tables.lengths,
        "length_vs_score_points": tables.a_unsteered[points] if len(tables.a_unsteered) else pd.DataFrame(),
        "grader_metrics": tables.metrics,
        "grader_shifts": tables.shifts,
        "score_distributions": tables.distributions,
        "missing_grades": tables.missing,
        "examples": tables.examples,
    }


def write_tables(folder: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Each table as ``<folder>/<name>.csv``."""
    for name, table in tables.items():
        write_csv(folder / f"{name}.csv", table)


def draw_figures(tables: ReportTables, run: Path) -> dict[str, str]:
    """The figures there is data for; returns their paths relative to the run directory, by key."""
    made = {}

    def draw(key: str, name: str, plot, *data) -> None:
        plot(*data, run / "figures" / name)
        made[key] = f"figures/{name}"

    if len(tables.effects) and (tables.effects["type"] != UNSTEERED).any():
        draw("effects", "effects.png", plot_effects, tables.effects)
    draw("distributions", "score_distributions.png", plot_distributions, tables.a_unsteered, tables.b_counts)
    pooled = tables.metrics[tables.metrics["set"] == "pooled"] if len(tables.metrics) else tables.metrics
    if len(pooled):
        draw("graders", "grader_qwk_bias.png", plot_grader_metrics, tables.shifts, pooled)
    if len(tables.heat):
        draw("heatmap", "student_grader_heatmap.png", plot_heatmap, tables.heat)
    draw("length", "length_vs_score.png", plot_length, tables.a_unsteered.dropna(subset=["normalised"]))
    return made
