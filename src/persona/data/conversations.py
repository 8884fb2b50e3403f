"""The one check of a chat conversation, torch-free so that commands can run it before anything heavy loads.

``persona fit`` (in memory and through ``datasets``) and ``persona screen`` call :func:`_checked_messages`; it lived
in :mod:`persona.training.data` (which imports Lightning and torch), and is still importable from there.
"""

from __future__ import annotations

CHAT_JSONL_FIX = 'Fix: one JSON object per line, {"messages": [{"role": ..., "content": ...}, ...]}.'


def _checked_messages(row, where: str) -> list[dict]:
    if not isinstance(row, dict) or "messages" not in row:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(
            f'{where}: missing "messages" (found {found}). '
            'Fix: each line must be {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}.'
        )
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects, got {messages!r:.80}.'
        )
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f'{where}: messages[{index}] = {message!r:.80} is not {{"role": str, "content": str}}. '
                "Fix: give every message a string role (system/user/assistant) and string content."
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(
            f"{where}: the conversation has no assistant turn, so there is nothing to train on. "
            'Fix: add {"role": "assistant", "content": ...} or drop the line.'
        )
    return messages
