"""The text of a study run's ``report.md``, section by section, from the tables report.py computed."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from persona.education.figures import order_types
from persona.study.records import markdown_table

if TYPE_CHECKING:
    from persona.education.results import Results

HUMAN_REFERENCES = {
    "score1": "Score1 (the official score)",
    "mean": "the mean of Score1 and Score2 (rounded half up for QWK and exact agreement)",
}
FIGURES_A = (  # (key in ``made``, caption), in the order they appear
    ("effects", "Effect sizes per trait"),
    ("heatmap", "Student × grader: mean normalised score (tables/student_grader_heatmap.csv)"),
    ("distributions", "Score distributions (tables/score_distributions.csv)"),
    ("length", "Answer length vs score (tables/length_vs_score.csv)"),
)


def render(results: Results, effects, metrics, shifts, missing, examples, lengths, made: dict) -> str:
    lines = [
        *_header(results.settings),
        *_method(results.settings, results.steering),
        *_experiment_a(effects, made, lengths, examples),
        *_experiment_b(metrics, shifts, made),
        *_missing_grades(missing),
    ]
    return "\n".join(lines)


def _fmt_ci(value, low, high) -> str:
    if not math.isfinite(value):
        return "—"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:+.3f}"
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def _ci_texts(frame, value: str, bounds: str) -> list[str]:
    """``value [low, high]`` per row, from the columns ``value``, ``<bounds>_low`` and ``<bounds>_high``."""
    columns = (frame[value], frame[f"{bounds}_low"], frame[f"{bounds}_high"])
    return [_fmt_ci(v, lo, hi) for v, lo, hi in zip(*columns, strict=True)]


def _link(path: str) -> str:
    return f"[`{path}`]({path})"


def _table(frame, csv: str, *, floatfmt: str = ".3f") -> list[str]:
    """A markdown table and the line that links the CSV it comes from."""
    return [markdown_table(frame, floatfmt=floatfmt), "", f"Table: {_link(csv)}", ""]


def _figure(caption: str, path: str) -> list[str]:
    return [f"![{caption}]({path})", "", f"*{caption}.*", ""]


def _header(s: dict) -> list[str]:
    """Title, model and data, and a note for each setting that limits what the numbers can say."""
    info = s.get("model_info", {})
    lines = [
        "# ASAP-SAS study: persona-steered students and graders",
        "",
        f"Model `{s['model']}`, steering layer **{info.get('layer')}** of {info.get('num_layers')} "
        f"(mean residual norm there {info.get('residual_norm', math.nan):.1f}); seed {s.get('seed')}; "
        f"answers from `{s['data_file']}`; human reference: "
        f"{HUMAN_REFERENCES[s.get('human_reference', 'score1')]}.",
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
    return lines


def _method(s: dict, steering) -> list[str]:
    """How a score is read, and the persona vectors and coefficients of the run."""
    lines = [
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
    if len(steering):
        lines += _table(steering, "steering.csv")
    return lines


def _experiment_a(effects, made: dict, lengths, examples) -> list[str]:
    lines = ["## Experiment A: steered students", ""]
    if len(effects):
        shown = effects.assign(effect_ci=_ci_texts(effects, "effect", "ci"))
        lines += [
            "Effect of a student type = its mean normalised score (0–1 within each set's range) minus the "
            "unsteered student's, under the same grader, over the (set, sample) items both answered; "
            "95% paired bootstrap CI.",
            "",
            *_table(
                shown[["grader", "type", "n", "missing", "mean_normalised", "effect_ci"]],
                "tables/effects.csv",
            ),
        ]
    for key, caption in FIGURES_A:
        if key in made:
            lines += _figure(caption, made[key])
    if len(lengths):
        lines += [markdown_table(lengths), ""]
    if len(examples):
        lines += [
            "### One answer per student type",
            "",
            *_table(examples, "tables/examples.csv", floatfmt=".2f"),
        ]
    return lines


def _experiment_b(metrics, shifts, made: dict) -> list[str]:
    lines = ["## Experiment B: steered graders vs human scores", ""]
    if len(metrics):
        lines += _grader_tables(metrics, shifts)
    if "graders" in made:
        lines += _figure("Grader QWK and bias", made["graders"])
    return lines


def _grader_tables(metrics, shifts) -> list[str]:
    """Pooled metrics, QWK per set, and each grader's change vs the unsteered grader."""
    pooled = metrics[metrics["set"] == "pooled"].drop(columns=["set"])
    per_set = metrics[metrics["set"] != "pooled"].pivot(index="grader", columns="set", values="qwk")
    per_set = per_set.reindex(order_types(per_set.index)).reset_index()
    per_set.columns = ["grader"] + [f"QWK set {c}" for c in per_set.columns[1:]]
    changes = shifts.assign(
        delta_bias_ci=_ci_texts(shifts, "delta_bias", "delta_bias_ci"),
        delta_qwk_ci=_ci_texts(shifts, "delta_qwk", "delta_qwk_ci"),
    )
    return [
        "Pooled over sets (QWK with labels over the union of the ranges; `mean_set_qwk` = mean of the "
        "defined per-set values). NaN = undefined (fewer than 2 items, or no variation).",
        "",
        markdown_table(pooled),
        "",
        markdown_table(per_set),
        "",
        "Change vs the unsteered grader on the same answers (95% paired bootstrap CI):",
        "",
        markdown_table(changes[["grader", "n_paired", "bias", "delta_bias_ci", "qwk", "delta_qwk_ci"]]),
        "",
        f"Tables: {_link('tables/grader_metrics.csv')}, {_link('tables/grader_shifts.csv')}",
        "",
    ]


def _missing_grades(missing) -> list[str]:
    if not len(missing):
        return ["## Missing grades", "", "None.", ""]
    return [
        "## Missing grades",
        "",
        markdown_table(missing),
        "",
        "Re-running the same command retries failed calls (`failures.jsonl` keeps every failed attempt).",
        "",
    ]
