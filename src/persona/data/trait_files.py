"""What a user's trait file is, told from its content (not its name): the one place every command asks.

Four formats describe a trait:

- ``artifact``: the seed's trait artifact, one JSON object ``{"instruction": [{"pos", "neg"} x 5], "questions":
  [...], "eval_prompt": "...{question}...{answer}..."}`` (optionally ``"eval_questions"``), or a folder holding
  ``extract.json``/``eval.json`` — the generation route (persona-prompted answers, judged, filtered, extracted);
- ``pairs``: contrastive pairs, JSONL ``{"prompt" | "messages", "positive", "negative"[, "split"]}``;
- ``trait_items``: TRAIT-format items (a JSON list or JSONL of ``situation, query, response_high1/2, response_low1/2``);
- ``persona_statements``: Anthropic persona statements, JSONL ``{"statement", "answer_matching_behavior"}``.

The last three are read as contrastive pairs. Torch-free and quick: the first record decides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from persona.core.errors import PersonaError

Kind = Literal["artifact", "pairs", "trait_items", "persona_statements"]
PAIR_KINDS: tuple[Kind, ...] = ("pairs", "trait_items", "persona_statements")

FORMATS: dict[Kind, str] = {
    "artifact": 'a trait artifact is one JSON object {"instruction": [{"pos", "neg"} x5], "questions": [...], '
    '"eval_prompt": "...{question}...{answer}..."} (or a folder with extract.json/eval.json)',
    "pairs": 'contrastive pairs are JSONL, a line {"prompt" (or "messages"), "positive", "negative"}',
    "trait_items": "TRAIT items are a JSON list or JSONL of {situation, query, response_high1, response_high2, "
    "response_low1, response_low2}",
    "persona_statements": 'Anthropic persona statements are JSONL, a line {"statement", "answer_matching_behavior"}',
}
NAMES: dict[Kind, str] = {
    "artifact": "a trait artifact (instructions, questions and a judge prompt for the generation route)",
    "pairs": "a contrastive pairs file",
    "trait_items": "a TRAIT-format item file",
    "persona_statements": "an Anthropic persona statements file",
}
ARTIFACT_KEYS = {"instruction", "questions", "eval_prompt"}


def kind_of_record(record: object) -> Kind | None:
    """The format a file's first record belongs to (None: none of them)."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "response_high1" in keys:
        return "trait_items"
    if {"positive", "negative"} <= keys:
        return "pairs"
    if {"statement", "answer_matching_behavior"} <= keys:
        return "persona_statements"
    return None


def identify(path: str | Path, field: str) -> Kind:
    """The format of the trait file (or artifact folder) at ``path``; refused in one line naming ``field`` and
    what each format needs when it is none of them."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "extract.json").is_file() or (path / "eval.json").is_file():
            return "artifact"
        raise PersonaError(
            f"{field}: {path} is a folder without extract.json or eval.json. Fix: give a trait file, "
            f"or a folder with the seed's extract.json/eval.json artifacts."
        )
    if not path.is_file():
        raise PersonaError(f"{field}: {path}: no such file. Fix: check the path.")
    record, whole_object = _first_record(path, field)
    if whole_object and ARTIFACT_KEYS & set(record) and kind_of_record(record) is None:
        return "artifact"
    kind = kind_of_record(record)
    if kind is None:
        found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise PersonaError(
            f"{field}: {path} is not a trait file persona reads (its first record has: {found or 'nothing'}). "
            f"Fix: {'; '.join(FORMATS.values())}."
        )
    return kind


def require(path: str | Path, field: str, accepted: tuple[Kind, ...], fix: str) -> Kind:
    """``identify``, refusing a known format this use can't take: the message says what the file is and ``fix``."""
    kind = identify(path, field)
    if kind not in accepted:
        raise PersonaError(f"{field}: {path} is {NAMES[kind]}. Fix: {fix}")
    return kind


def _first_record(path: Path, field: str) -> tuple[object, bool]:
    """(the first record, whether the file is one JSON object as a whole)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PersonaError(
            f"{field}: {path} is not UTF-8 text (byte {error.start}). Fix: save it as UTF-8 JSON/JSONL."
        ) from None
    if not text.strip():
        raise PersonaError(f"{field}: {path} is empty. Fix: {'; '.join(FORMATS.values())}.")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as error:
        whole, broken = None, error
    if isinstance(whole, dict):
        return whole, True
    if isinstance(whole, list):
        return (whole[0] if whole else None), False
    first_line = next(line for line in text.splitlines() if line.strip())
    try:
        return json.loads(first_line), False
    except json.JSONDecodeError:  # neither one JSON value nor JSONL: where the file stops being JSON
        raise PersonaError(
            f"{field}: {path}: invalid JSON at line {broken.lineno}, column {broken.colno}: {broken.msg}. "
            "Fix: correct the JSON there (a missing comma or quote is the usual cause)."
        ) from None
