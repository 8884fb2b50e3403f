"""ASAP-SAS inputs: the shipped per-set configuration and the official ``train.tsv`` answer files.

``datasets/asap_sas/sets.json`` holds, per essay set, the subject, topic, score range, the reading passage or
procedure (``source``), the question and the rubric. ``train.tsv`` (the official Kaggle file, or our
synthetic sample in the same format) has the columns ``Id, EssaySet, Score1, Score2, EssayText``; Score1 is
the official score, Score2 a second rater's. Every check names the file, the line, the column and the value.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from persona.data.traits import datasets_dir

COLUMNS = ("Id", "EssaySet", "Score1", "Score2", "EssayText")
ANSWER_FILES = ("train.tsv", "train_rel_2.tsv")  # the Kaggle names (release 1 and release 2)
REAL_DATA_HINT = (
    "Get the real files from the Kaggle competition 'The Hewlett Foundation: Short Answer Scoring' "
    "(https://www.kaggle.com/c/asap-sas/data) and pass their directory with --data_dir."
)


@dataclass(frozen=True)
class SetConfig:
    """One ASAP-SAS essay set: what the student reads and answers, and how the answer is scored."""

    set_id: int
    subject: str
    topic: str
    min_score: int
    max_score: int
    source: str
    question: str
    rubric: dict[int, str]
    key_elements: tuple[str, ...] = ()

    @property
    def labels(self) -> list[int]:
        """Every score the rubric allows, lowest first (the ``labels`` of quadratic weighted kappa)."""
        return list(range(self.min_score, self.max_score + 1))

    def normalise(self, score: float) -> float:
        """Score on 0-1 (min -> 0, max -> 1), so sets with different ranges can be averaged."""
        return (score - self.min_score) / (self.max_score - self.min_score)


def asap_dir() -> Path:
    return datasets_dir() / "asap_sas"


def default_sets_path() -> Path:
    return asap_dir() / "sets.json"


def default_data_dir() -> Path:
    return asap_dir() / "sample"


def load_sets(path: str | Path | None = None) -> dict[int, SetConfig]:
    """Read and check the per-set configuration: set id -> :class:`SetConfig`."""
    path = Path(path) if path is not None else default_sets_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"ASAP-SAS set configuration {path} not found. Fix: pass --sets_path to sets.json."
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    sets: dict[int, SetConfig] = {}
    for key, entry in raw.items():
        where = f"{path}: set {key!r}"
        for field in ("subject", "topic", "source", "question"):
            if not isinstance(entry.get(field), str) or not entry[field].strip():
                raise ValueError(f"{where}: field {field!r} must be a non-empty string.")
        low, high = entry.get("min_score"), entry.get("max_score")
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low < high <= 9):
            raise ValueError(
                f"{where}: min_score={low!r}, max_score={high!r}. Fix: integers with 0 <= min < max <= 9 "
                "(graders read single-digit scores)."
            )
        rubric = entry.get("rubric")
        expected = {str(s) for s in range(low, high + 1)}
        if not isinstance(rubric, dict) or set(rubric) != expected:
            raise ValueError(
                f"{where}: rubric keys {sorted(rubric) if isinstance(rubric, dict) else rubric!r} must be exactly "
                f"{sorted(expected)} (one description per score)."
            )
        try:
            set_id = int(key)
        except ValueError:
            raise ValueError(f'{where}: set keys must be integers such as "1".') from None
        sets[set_id] = SetConfig(
            set_id=set_id,
            subject=entry["subject"],
            topic=entry["topic"],
            min_score=low,
            max_score=high,
            source=entry["source"],
            question=entry["question"],
            rubric={int(s): text for s, text in rubric.items()},
            key_elements=tuple(entry.get("key_elements", ())),
        )
    return dict(sorted(sets.items()))


def choose_sets(sets: dict[int, SetConfig], wanted: Sequence[int] | None) -> list[SetConfig]:
    if wanted is None:
        return list(sets.values())
    unknown = [s for s in wanted if s not in sets]
    if unknown:
        raise ValueError(f"--sets {list(wanted)}: unknown set(s) {unknown}. Fix: choose from {sorted(sets)}.")
    return [sets[s] for s in dict.fromkeys(wanted)]


def find_answer_file(data_dir: str | Path) -> Path:
    """``data_dir`` itself if it is a file, else its ``train.tsv`` (or Kaggle's ``train_rel_2.tsv``)."""
    path = Path(data_dir)
    if path.is_file():
        return path
    for name in ANSWER_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"--data_dir {path}: no {' or '.join(ANSWER_FILES)} there. Fix: point --data_dir at the directory holding "
        f"the ASAP-SAS train.tsv. {REAL_DATA_HINT}"
    )


def _integer(value: str, *, where: str, column: str, allow_empty: bool) -> float:
    text = value.strip()
    if text == "" and allow_empty:
        return math.nan
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{where}: column {column} = {value!r} is not a whole number.")
    return number


def read_answers(path: str | Path, sets: dict[int, SetConfig]) -> pd.DataFrame:
    """Read and check an ASAP-SAS answer file.

    Returns columns ``Id`` (int), ``EssaySet`` (int), ``Score1`` (float, whole), ``Score2`` (float, NaN when
    empty), ``EssayText`` (str), in file order.
    """
    path = Path(path)
    frame = pd.read_csv(
        path,
        sep="\t",
        dtype=str,
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,
        encoding="utf-8",
        encoding_errors="replace",
    )
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(map(str, frame.columns))}). Fix: use "
            f"the official tab-separated layout with the header {chr(9).join(COLUMNS)!r}."
        )
    rows = []
    for index, record in enumerate(frame[list(COLUMNS)].itertuples(index=False)):
        where = f"{path}, line {index + 2}"
        set_id = _integer(record.EssaySet, where=where, column="EssaySet", allow_empty=False)
        if int(set_id) not in sets:
            raise ValueError(
                f"{where}: column EssaySet = {record.EssaySet!r} is not a known set (known: "
                f"{', '.join(map(str, sets))}). Fix: remove the row, or add the set to sets.json."
            )
        config = sets[int(set_id)]
        scores = []
        for column, allow_empty in (("Score1", False), ("Score2", True)):
            score = _integer(getattr(record, column), where=where, column=column, allow_empty=allow_empty)
            if not math.isnan(score) and not config.min_score <= score <= config.max_score:
                raise ValueError(
                    f"{where}: column {column} = {score:g} is outside set {config.set_id}'s range "
                    f"{config.min_score}-{config.max_score}."
                )
            scores.append(score)
        rows.append(
            {
                "Id": int(_integer(record.Id, where=where, column="Id", allow_empty=False)),
                "EssaySet": int(set_id),
                "Score1": scores[0],
                "Score2": scores[1],
                "EssayText": record.EssayText,
            }
        )
    answers = pd.DataFrame(rows, columns=list(COLUMNS))
    duplicated = answers["Id"][answers["Id"].duplicated()]
    if len(duplicated):
        raise ValueError(
            f"{path}: Id {int(duplicated.iloc[0])} appears more than once. Fix: Ids must be unique."
        )
    return answers


def sample_answers(answers: pd.DataFrame, set_ids: Sequence[int], n_per_set: int, seed: int) -> pd.DataFrame:
    """Up to ``n_per_set`` answers per set, drawn without replacement with a seed per (seed, set).

    Each set's draw depends only on its own seed, so adding a set or raising ``n_per_set`` keeps earlier draws
    as a prefix (a resumed or extended run grades the same answers).
    """
    parts = []
    for set_id in set_ids:
        rows = answers[answers["EssaySet"] == set_id]
        order = np.random.default_rng([seed, set_id]).permutation(len(rows))
        parts.append(rows.iloc[order[:n_per_set]])
    if not parts:
        return answers.iloc[:0]
    return pd.concat(parts, ignore_index=True)


def human_reference(answers: pd.DataFrame, reference: str) -> pd.Series:
    """The human score each grade is compared with: ``score1`` (official) or ``mean`` of both raters."""
    if reference == "score1":
        return answers["Score1"].astype(float)
    if reference == "mean":
        return answers[["Score1", "Score2"]].mean(axis=1, skipna=True)
    raise ValueError(f"human_reference={reference!r}. Fix: use score1 or mean.")
