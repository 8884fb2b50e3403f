"""The one chat-prompt builder: messages -> the prompt text or token ids every caller feeds a model.

What real chat models need and each caller used to handle (or not) on its own:
- thinking mode off for templates that have one (Qwen3's ``enable_thinking``), as the research code does;
- templates without a system role (Gemma, Mistral's older ones): the system text opens the first user turn;
- a tokenizer with no chat template: a single user turn is used as plain text (base models), anything
  more is refused with a fix;
- reasoning-channel text kept out of recorded answers (``<think>…</think>``, gpt-oss's analysis channel);
- one rule for a chat record (:func:`checked_messages`), so project, screen, fit, dataset and serve refuse the
  same records (a role ``"usr"`` or a ``null`` content was templated anyway, or died in jinja2).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from persona.core.errors import PersonaError

Messages = Sequence[Mapping[str, str]]

CHAT_ROLES = ("system", "user", "assistant")
MESSAGE_FIX = 'Fix: each message is {"role": "system"|"user"|"assistant", "content": "text"}'


def checked_messages(messages, where: str, *, last: str | None = None) -> list[dict]:
    """``messages`` as a list of dicts, or a :class:`PersonaError` naming ``where``, the message and the fix.

    The rule every chat record meets: a non-empty list; each message a ``{"role", "content"}`` object with a role
    of :data:`CHAT_ROLES` and string content; system messages only before the conversation, which opens with a
    user turn; the last message of role ``last`` when given (``"assistant"``: a response to read).
    """
    if not isinstance(messages, list) or not messages:
        raise PersonaError(f'{where}: "messages" is {messages!r:.60}, not a non-empty list. {MESSAGE_FIX}.')
    for index, message in enumerate(messages):
        _check_message(message, f"{where}: messages[{index}]")
    roles = [message["role"] for message in messages]
    turns = [index for index, role in enumerate(roles) if role != "system"]
    if not turns or roles[turns[0]] != "user" or "system" in roles[turns[0] :]:
        raise PersonaError(
            f"{where}: roles {roles} are out of order. Fix: optional system messages first, then a user turn, "
            "then the conversation."
        )
    if last is not None and roles[-1] != last:
        raise PersonaError(
            f"{where}: the last message is {roles[-1]!r}; it must be {last!r} here. {MESSAGE_FIX}."
        )
    return [dict(message) for message in messages]


def _check_message(message, where: str) -> None:
    if not isinstance(message, Mapping):
        raise PersonaError(f"{where} is {message!r:.60}, not an object. {MESSAGE_FIX}.")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise PersonaError(f"{where}: role {role!r} is not one of {', '.join(CHAT_ROLES)}. {MESSAGE_FIX}.")
    if not isinstance(content, str):
        raise PersonaError(
            f'{where} ({role}): content is {content!r:.40}, not a string. {MESSAGE_FIX} (use "" for none).'
        )
    checked_text(content, f"{where} ({role}) content")


def checked_text(text: str, where: str) -> str:
    """``text``, if UTF-8 can encode it: a JSON ``\\ud800`` escape reads as a lone surrogate, which tokenizers refuse
    with a TypeError deep inside their Rust code."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PersonaError(
            f"{where}: holds a lone UTF-16 surrogate ({text[error.start]!r} at character {error.start}), which is "
            "not text. Fix: repair the escape (a \\ud83d\\ude00 pair makes one emoji) or remove it."
        ) from None
    return text


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _template_kwargs(tokenizer) -> dict:
    return {"enable_thinking": False} if "enable_thinking" in str(tokenizer.chat_template) else {}


def _fold_system_into_user(messages: list[dict]) -> list[dict]:
    system = [m["content"] for m in messages if m.get("role") == "system"]
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if system and rest and rest[0].get("role") == "user":
        rest[0]["content"] = "\n\n".join([*system, rest[0]["content"]])
    elif system:
        rest.insert(0, {"role": "user", "content": "\n\n".join(system)})
    return rest


def render_chat(tokenizer, messages: Messages, *, add_generation_prompt: bool = True) -> str:
    """The conversation as the model's chat template writes it (a generation prompt opens the reply).

    ``messages`` are checked by :func:`checked_messages` first; callers that read them from a file check them
    there, with the file and line in the message.
    """
    messages = checked_messages(list(messages), "messages")
    if not has_chat_template(tokenizer):
        if len(messages) == 1 and messages[0].get("role") == "user":
            return str(messages[0]["content"])
        raise ValueError(
            f"{getattr(tokenizer, 'name_or_path', 'The tokenizer')!s} has no chat template, so a conversation of "
            f"{len(messages)} messages cannot be formatted. Fix: use an instruct/chat model, or set "
            "tokenizer.chat_template and save the tokenizer."
        )
    kwargs = {
        "tokenize": False,
        "add_generation_prompt": add_generation_prompt,
        **_template_kwargs(tokenizer),
    }
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as error:  # jinja2's TemplateError: "System role not supported" and kin
        if not type(error).__module__.startswith("jinja2"):
            raise
        if not any(m["role"] == "system" for m in messages) or "system" not in str(error).lower():
            raise _refused(tokenizer, messages, error) from error
    try:
        return tokenizer.apply_chat_template(_fold_system_into_user(messages), **kwargs)
    except Exception as error:
        if not type(error).__module__.startswith("jinja2"):
            raise
        raise _refused(tokenizer, messages, error) from error


def _refused(tokenizer, messages: list[dict], error: Exception) -> PersonaError:
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    return PersonaError(
        f"The chat template of {name} refuses roles {[m['role'] for m in messages]}: {error}. "
        "Fix: order the messages as the model's template expects (most alternate user and assistant)."
    )


def encode_chat(tokenizer, prompt: str | Messages) -> list[int]:
    """Token ids of a raw prompt string, or of a message list under the chat template (generation prompt added)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = tokenizer(render_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"Prompt {prompt!r} tokenizes to no tokens. Fix: pass a non-empty prompt.")
    return ids


_THINK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
_HARMONY_FINAL = "<|channel|>final<|message|>"
_HARMONY_END = re.compile(r"<\|(?:return|end|call)\|>")


def answer_text(tokenizer, token_ids: Sequence[int]) -> str:
    """The visible answer in generated ``token_ids``: special tokens and reasoning-channel text removed.

    gpt-oss writes an analysis channel before ``<|channel|>final<|message|>``; Qwen3/DeepSeek-R1-style
    models think inside ``<think>…</think>`` (the opening tag may sit in the prompt). A reply cut off
    while still reasoning has no answer: "".
    """
    ids = list(token_ids)
    full = tokenizer.decode(ids, skip_special_tokens=False)
    if _HARMONY_FINAL in full or "<|channel|>analysis" in full:
        final = full.split(_HARMONY_FINAL, 1)[1] if _HARMONY_FINAL in full else ""
        return _HARMONY_END.split(final, maxsplit=1)[0]
    visible = tokenizer.decode(ids, skip_special_tokens=True)
    if "<think>" not in visible and "</think>" not in visible:
        return visible
    visible = _THINK.sub("", visible)
    if "</think>" in visible:
        visible = visible.split("</think>", 1)[1]
    return visible.split("<think>", 1)[0].lstrip()
