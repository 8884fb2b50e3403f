"""Chat conversations through Hugging Face ``datasets``: a JSONL or Parquet file, a directory of them, a hub id.

A source is read into ``datasets``' Arrow cache and tokenised with ``Dataset.map``, whose fingerprint (the file,
the function, the tokenizer, ``max_length``) makes a rerun on unchanged data read the tokens back instead of
recomputing them; large sources are tokenised by ``num_proc`` worker processes.

JSONL is read as text lines, so every error names ``file:line`` exactly as the in-memory reader
(:func:`persona.training.data.read_chat_jsonl`) does; Parquet files and hub datasets name ``file: row N``. Every
conversation goes through the one validator, :func:`persona.data.conversations._checked_messages`. A bad row does not
stop the workers: its message is kept in an ``error`` column and the first one, in file order, is raised.

Hub ids (``org/name`` or ``org/name:split``, default split ``train``) are read from the local Hugging Face cache
when ``HF_HUB_OFFLINE=1`` (as ``make`` sets it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from persona.core.errors import PersonaError
from persona.data.conversations import CHAT_JSONL_FIX, _checked_messages
from persona.data.examples import parse_jsonl_line

CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")
LINES, ROWS = "lines", "rows"  # how a raw dataset holds records: JSONL text lines, or table rows
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
TOKEN_COLUMNS = ("input_ids", "labels", "source", "n_trained", "n_tokens", "error")
ROWS_PER_PROCESS = 4000  # below this, starting worker processes costs more than it saves


@contextmanager
def progress_bars(shown: bool):
    """``datasets``' progress bars only where they tell something (tokenising a large source), never for reading
    a file: a bad input stays one line on stderr."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_disabled = are_progress_bars_disabled()
    if not shown:
        disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            enable_progress_bars()


def chat_sources(source: str, flag: str) -> list[tuple[str, object, str]]:
    """``(origin, raw dataset, LINES or ROWS)`` per file of ``source`` (a file, a directory, a hub id)."""
    path = Path(source)
    if not is_hub_id(source, flag):
        return [(str(file), raw_file_dataset(file), kind_of(file)) for file in local_files(path, flag)]
    return [(source, hub_dataset(source, flag), ROWS)]


def is_hub_id(source: str, flag: str) -> bool:
    """False for an existing local path, True for what can only be a hub id; a missing file is refused."""
    path = Path(source)
    if path.exists():
        return False
    if path.suffix.lower() in CHAT_SUFFIXES or not HUB_ID.match(source):
        raise FileNotFoundError(f"{flag} {source}: no such file or directory. Fix: check the path.")
    return True


def kind_of(file: Path) -> str:
    return ROWS if file.suffix.lower() == ".parquet" else LINES


def local_files(path: Path, flag: str) -> list[Path]:
    """The file itself (any suffix but .parquet reads as JSONL, as before), or a directory's chat files, sorted."""
    files = [path]
    if path.is_dir():
        files = sorted(
            file for file in path.iterdir() if file.is_file() and file.suffix.lower() in CHAT_SUFFIXES
        )
    if not files:
        raise PersonaError(
            f"{flag} {path}: the directory holds no .jsonl, .json or .parquet file. "
            "Fix: point at a directory of chat files, or at one file."
        )
    for file in files:
        if not os.access(file, os.R_OK):
            raise PersonaError(f"{flag} {file}: not readable. Fix: check its permissions.")
    return files


def raw_file_dataset(file: Path):
    """The file's lines (JSONL) or rows (Parquet) as a ``datasets.Dataset``, cached by the file's path and mtime."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    builder = "parquet" if kind_of(file) == ROWS else "text"
    try:
        with progress_bars(False):
            return load_dataset(builder, data_files=str(file), split="train")
    except DatasetGenerationError as error:
        raise unreadable(file, error) from error


def unreadable(file: Path, error: Exception) -> PersonaError:
    cause = error.__cause__ or error.__context__
    if isinstance(cause, UnicodeDecodeError):
        try:
            file.read_bytes().decode("utf-8")
            start = cause.start
        except UnicodeDecodeError as exact:  # the offset in the file, not in datasets' read chunk
            start = exact.start
        return PersonaError(f"{file}: not UTF-8 text (byte {start}). Fix: save the file as UTF-8 JSONL.")
    return PersonaError(
        f"{file}: not a readable {'Parquet' if kind_of(file) == ROWS else 'text'} file ({cause or error}). "
        'Fix: give chat JSONL or Parquet with a "messages" column.'
    )


def hub_dataset(source: str, flag: str):
    """Split ``train`` (or the one after ``:``) of a hub dataset; offline, only from the local cache."""
    from datasets import load_dataset

    name, _, split = source.partition(":")
    try:
        with progress_bars(False):
            return load_dataset(name, split=split or "train")
    except (OSError, ValueError) as error:  # not cached / no such dataset (FileNotFoundError), unknown split
        reason = " ".join(str(error).split())[:160]
        raise PersonaError(
            f"{flag} {source}: no such file or directory, and hub dataset {name!r} split {split or 'train'!r} "
            f"could not be read from the local Hugging Face cache ({reason}). Fix: check the path, or run once "
            "with network access (HF_HUB_OFFLINE=0) so that `datasets` caches it."
        ) from None


def location(origin: str, kind: str, index: int) -> str:
    """What an error names: ``file:line`` for JSONL (lines count from 1), ``origin: row N`` for a table."""
    return f"{origin}:{index + 1}" if kind == LINES else f"{origin}: row {index + 1}"


def batch_records(batch: dict[str, list], indices: list[int], origin: str, kind: str) -> Iterator[tuple]:
    """``(where, record thunk)`` per non-blank row of a raw batch; a thunk raises ValueError on a bad line."""
    for position, index in enumerate(indices):
        where = location(origin, kind, index)
        if kind == LINES:
            text = batch["text"][position]
            if text.strip():
                yield where, lambda text=text, where=where: parse_jsonl_line(text, where, fix=CHAT_JSONL_FIX)
        else:
            record = {column: values[position] for column, values in batch.items()}
            yield where, lambda record=record: without_absent_keys(record)


def without_absent_keys(record: dict) -> dict:
    """A table row as the JSON object it came from: Arrow gives every message every key, absent ones as None."""
    messages = record.get("messages")
    if isinstance(messages, list):
        record = {
            **record,
            "messages": [
                {key: value for key, value in message.items() if value is not None}
                if isinstance(message, dict)
                else message
                for message in messages
            ],
        }
    return record


def checked_records(raw, origin: str, kind: str, check) -> list[tuple[str, dict]]:
    """``(where, record)`` of every row, each passed through ``check(record, where)`` (which raises)."""
    rows = []
    for start in range(0, len(raw), 1000):
        batch = raw[start : start + 1000]
        indices = list(range(start, start + len(next(iter(batch.values())))))
        for where, record in batch_records(batch, indices, origin, kind):
            value = record()
            check(value, where)
            rows.append((where, value))
    return rows


def read_chat_records(source: str, flag: str, check) -> list[dict]:
    """Every record of ``source`` (a file, a directory, a hub id), in order, each passed through
    ``check(record, where)``, which raises with ``where`` in its message."""
    records = []
    for origin, raw, kind in chat_sources(source, flag):
        rows = checked_records(raw, origin, kind, check)
        if not rows:
            raise PersonaError(f"{origin}: empty file (no records). {CHAT_JSONL_FIX}")
        records += [record for _, record in rows]
    return records


def tokenize_rows(batch, indices, *, origin: str, kind: str, tokenizer, max_length: int) -> dict:
    """``Dataset.map`` function: one tokenised conversation per non-blank row, or its error message."""
    from persona.data.conversations import IGNORE_INDEX, Conversation, tokenize_conversation

    out = {column: [] for column in TOKEN_COLUMNS}
    for where, record in batch_records(batch, indices, origin, kind):
        try:
            conversation = Conversation(_checked_messages(record(), where), where)
            item = tokenize_conversation(tokenizer, conversation)
            ids, labels, error = item.input_ids[:max_length], item.labels[:max_length], ""
            whole = len(item.input_ids)
        except ValueError as caught:  # validator, JSON and template errors: raised later, in file order
            ids, labels, error, whole = [], [], str(caught), 0
        out["n_tokens"].append(whole)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["source"].append(where)
        out["n_trained"].append(sum(label != IGNORE_INDEX for label in labels))
        out["error"].append(error)
    return out


def token_features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
            "source": Value("string"),
            "n_trained": Value("int32"),
            "n_tokens": Value("int32"),  # before the cut, to count the cut conversations
            "error": Value("string"),
        }
    )


def auto_num_proc(rows: int, num_proc: int | None) -> int | None:
    """Worker processes for ``rows``: the given count, else one per ``ROWS_PER_PROCESS`` rows up to the CPUs."""
    if num_proc is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_proc = min(cpus, rows // ROWS_PER_PROCESS)
    return num_proc if num_proc > 1 else None


def tokenized_source(origin: str, raw, kind: str, *, tokenizer, max_length: int, num_proc: int | None):
    """The tokenised rows of one raw dataset (cached by ``datasets``); raises the first bad row's message."""
    with progress_bars(len(raw) >= ROWS_PER_PROCESS):
        tokens = raw.map(
            tokenize_rows,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            fn_kwargs={"origin": origin, "kind": kind, "tokenizer": tokenizer, "max_length": max_length},
            features=token_features(),
            num_proc=auto_num_proc(len(raw), num_proc),
            desc=f"tokenising {Path(origin).name}",
        )
    error = next((message for message in tokens["error"] if message), None)
    if error:
        raise PersonaError(error)
    if len(tokens) == 0:
        raise PersonaError(f"{origin}: empty file (no records). {CHAT_JSONL_FIX}")
    return tokens


def tokenized_chats(
    sources: list[str], flag: str, *, tokenizer, max_length: int, num_proc: int | None = None
):
    """Every conversation of ``sources`` (files, directories, hub ids) tokenised, in order, as one Dataset."""
    from datasets import concatenate_datasets

    parts = [
        tokenized_source(origin, raw, kind, tokenizer=tokenizer, max_length=max_length, num_proc=num_proc)
        for source in sources
        for origin, raw, kind in chat_sources(source, flag)
    ]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]
