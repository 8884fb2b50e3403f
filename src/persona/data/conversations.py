"""Chat conversations to train on: the one check of a record, and tokenisation with labels on assistant turns only.

Torch-free, so commands check records before anything heavy loads. ``persona fit`` (in memory and through
``datasets``) and ``persona screen`` call :func:`_checked_messages`: the one chat rule of :mod:`persona.data.chat`
plus an assistant turn to train on. :mod:`persona.training.data` re-exports the tokenisation for its DataModule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persona.data.chat import checked_messages, render_chat
from persona.data.examples import read_jsonl_numbered

CHAT_JSONL_FIX = 'Fix: one JSON object per line, {"messages": [{"role": ..., "content": ...}, ...]}.'


def _checked_messages(row, where: str) -> list[dict]:
    """A fit record's messages: :func:`persona.data.chat.checked_messages`' rule, and an assistant turn to train on."""
    if not isinstance(row, dict) or "messages" not in row:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(
            f'{where}: missing "messages" (found {found}). '
            'Fix: each line must be {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}.'
        )
    messages = checked_messages(row["messages"], where)
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(
            f"{where}: the conversation has no assistant turn, so there is nothing to train on. "
            'Fix: add {"role": "assistant", "content": ...} or drop the line.'
        )
    return messages


IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF's loss) skips


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    source: str  # "file:line", for error messages


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant turns
    source: str


def read_chat_jsonl(path: str | Path) -> list[Conversation]:
    """Read and validate one chat JSONL file; every error names ``file:line`` and the fix."""
    return [
        Conversation(_checked_messages(row, f"{path}:{line_number}"), f"{path}:{line_number}")
        for line_number, row in read_jsonl_numbered(path, fix=CHAT_JSONL_FIX)
    ]


def check_chat_template(tokenizer, model: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer of {model!r} has no chat template, so conversations cannot be formatted. "
            "Fix: use an instruct/chat model (e.g. smollm2-135m, Qwen/Qwen2.5-7B-Instruct) or save a tokenizer "
            "with tokenizer.chat_template set and pass its directory as model."
        )


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return render_chat(tokenizer, messages, add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The templated text and the ``[start, end)`` character span of each assistant turn in it."""
    messages = conversation.messages
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        except Exception:  # some templates cannot render an empty conversation
            before = ""
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(
                f"{conversation.source}: the chat template does not render this conversation prefix by prefix "
                f"(turn {index} changes earlier text), so assistant tokens cannot be located. "
                "Fix: use a template that renders earlier turns unchanged (e.g. without reasoning-stripping)."
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(
    tokenizer, conversation: Conversation, *, max_length: int | None = None
) -> TokenizedChat:
    """Token ids of the templated conversation and labels equal to them on assistant turns only."""
    text, spans = assistant_char_spans(tokenizer, conversation)
    if tokenizer.is_fast:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        starts = [start for start, _ in encoded["offset_mapping"]]
    else:  # no offsets: a token starts where the tokenised prefix ending there ends (exact for most vocabularies)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        starts = None
    labels = [IGNORE_INDEX] * len(ids)
    for span_start, span_end in spans:
        if starts is not None:
            # A token belongs to the turn when it starts inside it; one straddling the header stays masked.
            positions = [i for i, start in enumerate(starts) if span_start <= start < span_end]
        else:
            first = len(tokenizer(text[:span_start], add_special_tokens=False)["input_ids"])
            last = len(tokenizer(text[:span_end], add_special_tokens=False)["input_ids"])
            positions = range(first, last)
        for position in positions:
            labels[position] = ids[position]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedChat(ids, labels, conversation.source)
