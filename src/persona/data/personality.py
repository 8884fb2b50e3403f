"""TRAIT-format personality items (and Anthropic persona statements) as contrastive pair records."""

from __future__ import annotations

import json
import os
from pathlib import Path

TRAIT_ITEM_FIELDS = (
    "personality",
    "situation",
    "query",
    "response_high1",
    "response_high2",
    "response_low1",
    "response_low2",
)


def read_trait_items(path: str | Path) -> list[dict]:
    """Items from a JSON list or JSONL file; every TRAIT field must be a non-empty string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        items = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}."
        ) from error
    for number, item in enumerate(items, start=1):
        missing = [f for f in TRAIT_ITEM_FIELDS if not isinstance(item.get(f), str) or not item[f].strip()]
        if missing:
            raise ValueError(
                f"{path}: item {number} lacks {', '.join(missing)}. Fix: TRAIT items need {TRAIT_ITEM_FIELDS}."
            )
    return items


def trait_items_as_pairs(items: list[dict]) -> list[dict]:
    """Each item gives two pairs: (high1, low1) and (high2, low2), prompt = situation + query."""
    pairs = []
    for item in items:
        prompt = f"{item['situation'].strip()} {item['query'].strip()}"
        for suffix in ("1", "2"):
            pair = {
                "prompt": prompt,
                "positive": item[f"response_high{suffix}"],
                "negative": item[f"response_low{suffix}"],
            }
            if "split" in item:
                pair["split"] = item["split"]
            pairs.append(pair)
    return pairs


def persona_statements_as_pairs(path: str | Path) -> list[dict]:
    """Anthropic persona JSONL (``statement``, ``answer_matching_behavior``): agreeing with a statement
    that matches the behaviour is positive, disagreeing is negative."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "statement" not in record or "answer_matching_behavior" not in record:
            raise ValueError(f"{path}:{number}: needs 'statement' and 'answer_matching_behavior'.")
        matching = record["answer_matching_behavior"].strip()
        other = "No" if matching.lower().startswith("yes") else "Yes"
        prompt = f'Is the following statement something you would say?\n"{record["statement"]}"'
        pairs.append({"prompt": prompt, "positive": matching, "negative": other})
    return pairs


def items_dir() -> Path:
    from persona.data.traits import datasets_dir

    return datasets_dir() / "personality"


def available_traits() -> list[str]:
    return sorted(path.stem for path in items_dir().glob("*.json"))


def resolve_items_path(trait: str) -> tuple[str, Path]:
    """(trait name, item file): a shipped trait name (datasets/personality/<name>.json) or a JSON/JSONL path."""
    if trait.endswith((".json", ".jsonl")) or "/" in trait or os.sep in trait:
        path = Path(trait).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TRAIT item file {path} does not exist. Fix: check the path.")
        return path.stem, path
    path = items_dir() / f"{trait}.json"
    if not path.is_file():
        raise ValueError(
            f"Unknown personality trait {trait!r}: no {path}. Available: {', '.join(available_traits()) or 'none'}. "
            "Fix: pick one of those or pass a TRAIT-format JSON/JSONL file."
        )
    return trait, path


def split_items(items: list[dict], split: str | None, source: Path | str) -> list[dict]:
    """Items of one split (all when ``split`` is None), each with its 1-based position in the file as ``item``."""
    numbered = [{**item, "item": number} for number, item in enumerate(items, start=1)]
    if split is None:
        return numbered
    chosen = [item for item in numbered if item.get("split") == split]
    if not chosen:
        found = sorted({str(item.get("split")) for item in items})
        raise ValueError(
            f"{source}: no items with split={split!r} (splits found: {', '.join(found)}). "
            "Fix: choose one of those with --split."
        )
    return chosen
