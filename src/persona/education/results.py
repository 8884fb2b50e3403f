"""A finished education run read back: its settings, sets, answers, grades, failures and steering table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from persona.core.errors import PersonaError
from persona.core.store import read_journal, read_json
from persona.education.data import load_sets


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


# settings.json fields the report and the comparison read, with their types (the rest is kept as it is).
SETTINGS_FIELDS = {"model": str, "sets_path": str, "n_bootstrap": int, "seed": int, "human_reference": str}


REQUIRED_SETTINGS = ("model", "sets_path")


def read_settings(run_dir: Path) -> dict:
    """A run's settings.json, checked: the one reader of it for the report and the comparison."""
    path = run_dir / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a `persona education` run directory. "
            "Fix: pass the --run_dir of a study run."
        )
    settings = read_json(path, what="education settings file")
    for field, kind in SETTINGS_FIELDS.items():
        value = settings.get(field)
        if (value is None and field in REQUIRED_SETTINGS) or (
            value is not None and not isinstance(value, kind)
        ):
            raise PersonaError(
                f"{path}: field {field!r} is {value!r:.40}, not a {kind.__name__}. Fix: re-run the study with "
                f"--run_dir {run_dir} (finished work is reused)."
            )
    return settings


def load_results(run_dir: str | Path) -> Results:
    run_dir = Path(run_dir)
    settings = read_settings(run_dir)
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
