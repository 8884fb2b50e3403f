"""The files `persona project` scores in place: a CSV (prompt, answer) or a chat JSONL (messages).

Score columns follow the seed's ``cal_projection``: ``<model-short-name>_<vector-file-stem>_<type>_layer<L>``.
Rewrites keep every other column as it was (read as text) and the rows in their original order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from persona.core.store import write_csv, write_jsonl
from persona.data.chat import checked_messages
from persona.data.examples import Example, format_prompt, read_csv_checked, read_jsonl
from persona.models import model_short_name


def projection_column(model: str, vector_path: str | Path, projection_type: str, layer: int) -> str:
    """The seed's column name: ``<model-short-name>_<vector-file-stem>_<type>_layer<L>``."""
    stem = Path(vector_path).name.split(".")[0]  # the seed cuts at the first dot
    return f"{model_short_name(model)}_{stem}_{projection_type}_layer{layer}"


def read_scored_file(path: Path) -> pd.DataFrame | list[dict]:
    """A CSV (columns prompt, answer) as a DataFrame, or a JSONL of {messages: [...]} records."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        read_csv_checked(path, ("prompt", "answer"))  # existence, header and columns, with its messages
        # Read as text so the rewrite leaves other columns as they were ("007" stays "007", "" stays "").
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = frame.index[frame["prompt"] == ""].tolist()
        if missing:
            raise ValueError(
                f"{path}: column 'prompt' is empty in row(s) {missing[:5]}. Fix: fill every prompt."
            )
        return frame
    if suffix in (".jsonl", ".json"):
        records = read_jsonl(path)
        for line, record in enumerate(records, start=1):
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError(
                    f"{path}: record {line}: no field 'messages' (the chat, its last message the response to "
                    "score). Fix: use the chat JSONL format."
                )
            checked_messages(record["messages"], f"{path}: record {line}", last="assistant")
        return records
    raise ValueError(
        f"{path}: unknown file type {suffix!r}. Fix: give a .csv (prompt, answer) or .jsonl (messages)."
    )


def present_fields(data: pd.DataFrame | list[dict]) -> set[str]:
    if isinstance(data, pd.DataFrame):
        return set(map(str, data.columns))
    return set.intersection(*(set(record) for record in data))


def scored_file_examples(path: Path, data: pd.DataFrame | list[dict], tokenizer) -> list[Example]:
    if isinstance(data, pd.DataFrame):
        return [
            Example(prompt, answer, 0, f"{path.name}:{row}")
            for row, (prompt, answer) in enumerate(zip(data["prompt"], data["answer"], strict=True))
        ]
    return [
        Example(
            format_prompt(tokenizer, {"messages": record["messages"][:-1]}, where=f"{path}: record {line}"),
            record["messages"][-1]["content"],
            0,
            f"{path.name}:{line}",
        )
        for line, record in enumerate(data, start=1)
    ]


def write_scores(path: Path, data: pd.DataFrame | list[dict], columns: dict[str, np.ndarray]) -> None:
    """Add (or replace) score columns and rewrite ``path`` atomically, rows in their original order."""
    if isinstance(data, pd.DataFrame):
        for name, values in columns.items():
            data[name] = values
        write_csv(path, data)
        return
    for row, record in enumerate(data):
        for name, values in columns.items():
            value = float(values[row])
            record[name] = None if math.isnan(value) else value  # JSON has no NaN
    write_jsonl(path, data)
