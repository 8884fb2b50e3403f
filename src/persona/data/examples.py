"""Read the examples that persona vectors are made from: scored pos/neg CSVs and contrastive pairs.

An :class:`Example` is one (chat-formatted prompt, response) with a label: 1 shows the trait, 0 doesn't.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from persona.core.errors import NoPairsLeft
from persona.data.chat import checked_messages, checked_text, has_chat_template, render_chat, user_turn


@dataclass(frozen=True)
class Example:
    prompt: str  # the full chat-formatted prompt, ending where the response starts
    response: str
    label: int  # 1 = shows the trait, 0 = its opposite
    example_id: str


def read_csv_checked(
    path: str | Path, required: tuple[str, ...], *, numeric: tuple[str, ...] = (), flag: str = ""
) -> pd.DataFrame:
    """A CSV with ``required`` columns (``numeric`` ones holding numbers or blanks); errors name file, column, row."""
    path = Path(path)
    where = f"{flag} {path}".strip()
    if not path.is_file():
        raise FileNotFoundError(
            f"{where} does not exist. Fix: check the path (or run `persona generate` first)."
        )
    try:
        frame = pd.read_csv(path, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{where} is empty. Fix: point at a CSV with a header and rows.") from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{where}: not UTF-8 text (byte {error.start}: {error.reason}); a binary file or another encoding. "
            "Fix: save the CSV as UTF-8."
        ) from None
    except pd.errors.ParserError as error:
        raise ValueError(
            f"{where}: not a readable CSV ({' '.join(str(error).split())}). Fix: check its quoting."
        ) from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, frame.columns))}). "
            f"Fix: use the generate step's CSV format ({', '.join(required)})."
        )
    if frame.empty:
        raise ValueError(f"{where} has a header but no rows. Fix: point at a CSV with rows.")
    for column in numeric:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame.index[values.isna() & frame[column].notna()].tolist()
        if bad:
            raise ValueError(
                f"{where}: column {column!r} holds non-numbers, e.g. {frame[column][bad[0]]!r} in row {bad[0] + 1}. "
                "Fix: scores must be numbers (or empty for a missing judgement)."
            )
        frame[column] = values
    return frame


def scored_csv_examples(
    pos_path: str | Path,
    neg_path: str | Path,
    trait: str,
    *,
    threshold: float = 50.0,
    no_filter: bool = False,
) -> list[Example]:
    """Effective pairs as in the seed: row i of pos and row i of neg are kept together when
    pos[trait] >= threshold, neg[trait] < 100 - threshold and both coherences >= 50."""
    required = ("prompt", "answer") if no_filter else ("prompt", "answer", trait, "coherence")
    numeric = () if no_filter else (trait, "coherence")
    pos = read_csv_checked(pos_path, required, numeric=numeric, flag="--pos_path")
    neg = read_csv_checked(neg_path, required, numeric=numeric, flag="--neg_path")
    if no_filter:
        keep_pos = pd.Series(True, index=pos.index)
        keep_neg = pd.Series(True, index=neg.index)
    else:
        if len(pos) != len(neg):
            raise ValueError(
                f"{pos_path} has {len(pos)} rows but {neg_path} has {len(neg)}: the seed's filter pairs row i with "
                "row i. Fix: generate both with the same questions and --n_per_question, or pass --no_filter."
            )
        conditions = {
            f"positive {trait} >= {threshold}": pos[trait] >= threshold,
            f"negative {trait} < {100 - threshold}": neg[trait] < 100 - threshold,
            "positive coherence >= 50": pos["coherence"] >= 50,
            "negative coherence >= 50": neg["coherence"] >= 50,
        }
        keep = pd.Series(True, index=pos.index)
        for condition in conditions.values():
            keep &= condition.fillna(False).to_numpy()
        if not keep.any():
            dropped = "; ".join(
                f"{name}: fails for {int((~cond.fillna(False)).sum())} rows"
                for name, cond in conditions.items()
            )
            raise NoPairsLeft(
                f"No effective pairs in {pos_path} / {neg_path} for trait {trait!r} at threshold {threshold} "
                f"(of {len(pos)} pairs — {dropped}). Fix: lower --threshold, generate more samples, or --no_filter."
            )
        keep_pos = keep_neg = keep
    examples = []
    for label, frame, keep, path in ((1, pos, keep_pos, pos_path), (0, neg, keep_neg, neg_path)):
        for index, row in frame[keep.to_numpy()].iterrows():
            examples.append(
                Example(str(row["prompt"]), _text(row["answer"]), label, f"{Path(path).name}:{index}")
            )
    return examples


def _text(value) -> str:
    return "" if pd.isna(value) else str(value)


def parse_jsonl_line(line: str, where: str, *, fix: str = "Fix: one JSON object per line.") -> dict:
    """One JSONL line as an object; errors start with ``where`` (``file:line``) and end with ``fix``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno}). {fix}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSON {type(record).__name__}, but each line must be an object. {fix}")
    return record


def read_jsonl_numbered(
    path: str | Path, *, fix: str = "Fix: one JSON object per line."
) -> list[tuple[int, dict]]:
    """``(line_number, record)`` for each non-blank line; errors name ``file:line`` and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Fix: check the path.")
    records = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    records.append((line_number, parse_jsonl_line(line, f"{path}:{line_number}", fix=fix)))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {error.start}). Fix: save the file as UTF-8 JSONL."
        ) from None
    if not records:
        raise ValueError(f"{path}: empty file (no records). {fix}")
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    return [record for _, record in read_jsonl_numbered(path)]


def format_prompt(tokenizer, record: dict, *, where: str) -> str:
    """The chat-formatted prompt of a record with ``messages`` (chat) or ``prompt`` (a user turn)."""
    messages = prompt_messages(record, where)
    if not has_chat_template(tokenizer) and "messages" in record:
        raise ValueError(f"{where}: 'messages' given but the tokenizer has no chat template.")
    return render_chat(tokenizer, messages)


def prompt_messages(record: dict, where: str) -> list[dict]:
    """A record's prompt as chat messages ending in a user turn: its ``messages``, or its ``prompt`` string."""
    if "messages" in record:
        return checked_messages(record["messages"], where, last="user")
    if isinstance(record.get("prompt"), str):
        return user_turn(checked_text(record["prompt"], f"{where}: field 'prompt'"))
    raise ValueError(f"{where}: needs a 'prompt' string or a 'messages' list.")


def read_pair_records(path: str | Path, field: str = "--pairs_path") -> list[dict]:
    """Contrastive pair records from a pairs JSONL, a TRAIT item file or an Anthropic persona JSONL (told apart
    by content); a trait artifact or any other file is refused naming ``field``."""
    from persona.data import trait_files
    from persona.data.personality import persona_statements_as_pairs, read_trait_items, trait_items_as_pairs

    kind = trait_files.require(
        path,
        field,
        trait_files.PAIR_KINDS,
        fix=f"its questions make vectors by the generation route: persona generate --trait {path} "
        f"(pos and neg), then persona extract --pos_path/--neg_path; or a study with traits: [{path}].",
    )
    if kind == "trait_items":
        return trait_items_as_pairs(read_trait_items(path))
    if kind == "persona_statements":
        return persona_statements_as_pairs(path)
    return read_jsonl(path)


def read_checked_pairs(path: str | Path, field: str = "--pairs_path") -> list[dict]:
    """Every pair of a pairs/TRAIT/persona-statements file, each checked (:func:`checked_pair`, torch-free);
    errors name ``field`` and file:line."""
    records = read_pair_records(path, field)
    for number, record in enumerate(records, start=1):
        checked_pair(record, f"{field}: {path}:{number}")
    return records


def checked_pair(record: dict, where: str) -> list[dict]:
    """A contrastive pair's prompt as chat messages (:func:`prompt_messages`), its two answers checked as text."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a pair is a JSON object, got {type(record).__name__}.")
    for field in ("positive", "negative"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise ValueError(f"{where}: field {field!r} must be a non-empty string.")
        checked_text(record[field], f"{where}: field {field!r}")
    return prompt_messages(record, where)


def check_example_files(
    pos_path: str | None, neg_path: str | None, pairs_path: str | None, trait: str | None, no_filter: bool
) -> None:
    """Read the example files' rows and columns (no tokenizer, no torch): bad input fails in well under a second."""
    if pairs_path is not None:
        read_checked_pairs(pairs_path)
        return
    required = ("prompt", "answer") if no_filter else ("prompt", "answer", trait or "", "coherence")
    numeric = () if no_filter else (trait or "", "coherence")
    read_csv_checked(pos_path, required, numeric=numeric, flag="--pos_path")
    read_csv_checked(neg_path, required, numeric=numeric, flag="--neg_path")


def contrastive_pair_examples(path: str | Path, tokenizer, *, split: str | None = None) -> list[Example]:
    """Pairs ``{prompt | messages, positive, negative[, split]}``: each gives one pos and one neg example."""
    examples = []
    for line_number, record in enumerate(read_pair_records(path), start=1):
        where = f"{path}:{line_number}"
        checked_pair(record, where)
        if split is not None and record.get("split", split) != split:
            continue
        prompt = format_prompt(tokenizer, record, where=where)
        examples.append(Example(prompt, record["positive"], 1, f"{Path(path).name}:{line_number}:pos"))
        examples.append(Example(prompt, record["negative"], 0, f"{Path(path).name}:{line_number}:neg"))
    if not examples:
        raise ValueError(f"{path}: no pairs{'' if split is None else f' with split={split!r}'}.")
    return examples
