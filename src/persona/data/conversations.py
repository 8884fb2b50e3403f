"""The one check of a chat conversation, torch-free so that commands can run it before anything heavy loads.

``persona fit`` (in memory and through ``datasets``) and ``persona screen`` call :func:`_checked_messages`: the one
chat rule of :mod:`persona.chat` plus an assistant turn to train on. It lived in :mod:`persona.training.data` (which
imports Lightning and torch), and is still importable from there.
"""

from __future__ import annotations

CHAT_JSONL_FIX = 'Fix: one JSON object per line, {"messages": [{"role": ..., "content": ...}, ...]}.'


def _checked_messages(row, where: str) -> list[dict]:
    """A fit record's messages: :func:`persona.chat.checked_messages`' rule, and an assistant turn to train on."""
    from persona.chat import checked_messages

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
