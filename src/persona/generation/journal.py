"""Plan and storage of `persona generate`: persona-prompted answers to a trait's questions.

As the seed's ``eval_persona.py``: every question is asked under every one of the trait's 5 instructions
(system prompt ``You are a/an <name> assistant. <instruction>``), ``n_per_question`` times each, with
question ids ``<trait>_<i>_<pos|neg>_<k>`` (``<trait>_<i>`` without a persona); sampling at temperature 1
(greedy when ``n_per_question == 1``), top-p 1, at least one new token.

Resumable. The plan (every (question_id, sample) key, in the seed's order) is cut into fixed batches, each
with its own seed derived from its keys (the static path samples a batch from it); each answer also has a seed
derived from its own key (the engine samples that answer from it, whatever else is in flight). Finished rows go to
a per-rank JSONL journal (``<output>.parts/rank<r>.jsonl``; one line per row, each write fsynced): the static path
appends a batch's rows once judged, the engine each answer the moment it finishes and again once judged (the later
line of a key wins). So ``kill -9`` loses at most the batch in flight (static) or the answers in flight (engine),
and a torn last line is dropped on resume. A re-run regenerates only what is missing (the static path whole
batches, with the same seed, writing only the missing keys; the engine the missing answers), so a resumed run gives
the same rows as an uninterrupted one. At the end the CSV is rewritten atomically in plan order (row i of a pos
file pairs with row i of the neg file, as `persona extract` expects) and the journal removed. Rows whose judge
scores are missing keep empty cells; the next run of the same command re-judges them without regenerating.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from persona.core.store import KeyedJournal, atomic_write, batch_seed, check_signature
from persona.data.chat import user_turn
from persona.data.traits import Trait

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (question_id, sample index)


def output_columns(trait: str) -> list[str]:
    return [
        "question",
        "prompt",
        "answer",
        "question_id",
        "sample",
        trait,
        "coherence",
        f"{trait}_method",
        "coherence_method",
        "judge",
    ]


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class WorkItem:
    question_id: str
    sample: int
    question: str
    system: str | None  # the persona system prompt, None without a persona

    @property
    def key(self) -> Key:
        return (self.question_id, self.sample)

    def messages(self) -> list[dict[str, str]]:
        user = user_turn(self.question)
        return user if self.system is None else [{"role": "system", "content": self.system}, *user]


def plan_items(
    trait: Trait,
    instruction_type: str | None,
    assistant_name: str | None,
    n_per_question: int,
    max_questions: int | None = None,
) -> list[WorkItem]:
    """Every (question, instruction, sample) in the seed's order: question i, then instruction k, then sample."""
    items = []
    for i, question in enumerate(trait.questions[:max_questions]):
        if instruction_type is None:
            items += [WorkItem(f"{trait.name}_{i}", s, question, None) for s in range(n_per_question)]
            continue
        for k in range(len(trait.instructions)):
            system = trait.system_prompt(instruction_type, k, assistant_name)
            qid = f"{trait.name}_{i}_{instruction_type}_{k}"
            items += [WorkItem(qid, s, question, system) for s in range(n_per_question)]
    return items


def pending_batches(items: list[WorkItem], batch_size: int, done: set[Key], seed: int) -> list[dict]:
    """The fixed batches of the plan that still have unfinished keys, as plain dicts (Lightning-friendly)."""
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pending = [item.key not in done for item in chunk]
        if any(pending):
            batches.append(
                {
                    "seed": batch_seed(seed, *(f"{item.question_id}#{item.sample}" for item in chunk)),
                    "question_id": [item.question_id for item in chunk],
                    "sample": [item.sample for item in chunk],
                    "question": [item.question for item in chunk],
                    "messages": [item.messages() for item in chunk],
                    "pending": pending,
                    "row_seeds": [batch_seed(seed, f"{item.question_id}#{item.sample}") for item in chunk],
                }
            )
    return batches


def order_key(row: dict) -> tuple:
    """Plan order from a row's key: question index, instruction index, sample (unparseable ids last)."""
    match = re.search(r"_(\d+)(?:_(?:pos|neg)_(\d+))?$", row["question_id"])
    if match is None:
        return (math.inf, 0, row["question_id"], row["sample"])
    return (int(match.group(1)), int(match.group(2) or -1), row["question_id"], row["sample"])


# ------------------------------------------------------------------------------------------------- storage


class ResponseStore:
    """One output: the finished CSV, a ``.meta.json`` with the settings, and per-rank journals of a run in progress."""

    def __init__(self, output_path: str | Path, trait: str):
        self.csv_path = Path(output_path)
        self.parts_dir = Path(f"{output_path}.parts")
        self.meta_path = Path(f"{output_path}.meta.json")
        self.trait = trait
        self.columns = output_columns(trait)
        self._journals: dict[int, KeyedJournal] = {}

    def journal(self, rank: int) -> KeyedJournal:
        if rank not in self._journals:
            self._journals[rank] = KeyedJournal(
                self.parts_dir / f"rank{rank}.jsonl",
                ("question_id", "sample"),
                damaged_path=f"{self.csv_path}.damaged",  # outlives the parts directory
            )
        return self._journals[rank]

    def journal_path(self, rank: int) -> Path:
        return self.journal(rank).path

    def remove_all(self) -> None:
        for path in (self.csv_path, self.meta_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def check_meta(self, signature: dict) -> None:
        """Refuse to mix rows made with other settings; write the settings on a fresh output."""
        check_signature(
            self.meta_path,
            signature,
            command="persona generate",
            subject=self.csv_path,
            fix="choose another --output_path, or pass --overwrite true to replace it (a sampled run made on the "
            "static path, e.g. before the engine, resumes with --engine false)",
            owned=(self.csv_path, self.parts_dir),
        )

    def load(self) -> dict[Key, dict]:
        """Every finished row, keyed. The CSV wins over the journals (it holds re-judged scores); within a journal the
        last line of a key wins (the engine journals an answer as it finishes, then again once judged)."""
        rows: dict[Key, dict] = {}
        for path in sorted(self.parts_dir.glob("rank*.jsonl")):
            journal = KeyedJournal(path, ("question_id", "sample"))
            latest = {journal.key(row): row for row in journal.rows()}
            for key, row in latest.items():
                rows.setdefault(key, row)
        if self.csv_path.is_file():
            for row in self.read_csv():
                rows[(row["question_id"], row["sample"])] = row
        return rows

    def read_csv(self) -> list[dict]:
        with self.csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in self.columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"{self.csv_path}: missing column(s) {', '.join(missing)}. Fix: pass "
                    "--overwrite true to regenerate it, or choose another --output_path."
                )
            rows = []
            for row in reader:
                row = {column: (row[column] if row[column] != "" else None) for column in self.columns}
                row["sample"] = int(row["sample"])
                row["answer"] = row["answer"] or ""
                for metric in (self.trait, "coherence"):
                    row[metric] = None if row[metric] is None else float(row[metric])
                rows.append(row)
            return rows

    def append(self, rank: int, rows: list[dict]) -> None:
        self.journal(rank).append(rows)

    def write_csv(self, rows: list[dict]) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", encoding="utf-8") as handle:
                # Text always quoted: a bare "\r" in an answer would otherwise split the row for pandas.
                writer = csv.DictWriter(
                    handle, fieldnames=self.columns, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC
                )
                writer.writeheader()
                for row in sorted(rows, key=order_key):
                    writer.writerow({c: ("" if row.get(c) is None else row[c]) for c in self.columns})
                handle.flush()
                os.fsync(handle.fileno())

        atomic_write(self.csv_path, write)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
