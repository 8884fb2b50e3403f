"""The prompts (and responses, when the file has them) an :class:`~persona.training.monitor.ActivationMonitor` measures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from persona.data.examples import format_prompt
from persona.data.scored_files import read_scored_file, scored_file_examples


def read_monitor_prompts(
    tokenizer, *, prompts: Sequence[str] | None = None, eval_file: str | None = None
) -> tuple[list[str], list[str] | None]:
    """Chat-formatted prompts, and the responses when the source has them (else None).

    ``prompts`` are user turns. ``eval_file`` is a chat JSONL (``messages``, the last one the response),
    a response CSV (``prompt`` already chat-formatted, ``answer``) or a trait JSON (its ``questions``).
    """
    if (prompts is None) == (eval_file is None):
        raise ValueError("ActivationMonitor: pass exactly one of prompts or eval_file.")
    if prompts is not None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError(
                f"ActivationMonitor: prompts={prompts!r}. Fix: pass a non-empty list of user prompts."
            )
        return [
            format_prompt(tokenizer, {"prompt": str(p)}, where=f"prompts[{i}]") for i, p in enumerate(prompts)
        ], None
    path = Path(eval_file)
    if not path.is_file():
        raise FileNotFoundError(f"ActivationMonitor: eval_file {path} does not exist. Fix: check the path.")
    if path.suffix.lower() == ".json":
        try:
            artifact = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            artifact = None  # a JSONL file named .json: read below
        if isinstance(artifact, dict):
            questions = artifact.get("questions")
            if (
                not isinstance(questions, list)
                or not questions
                or not all(isinstance(q, str) and q for q in questions)
            ):
                raise ValueError(
                    f"ActivationMonitor: {path}: field 'questions' must be a non-empty list of strings "
                    "(trait artifact format)."
                )
            return [
                format_prompt(tokenizer, {"prompt": q}, where=f"{path}: questions[{i}]")
                for i, q in enumerate(questions)
            ], None
    examples = scored_file_examples(path, read_scored_file(path), tokenizer)
    return [e.prompt for e in examples], [e.response for e in examples]
