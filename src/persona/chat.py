"""The one chat-prompt builder: messages -> the prompt text or token ids every caller feeds a model.

What real chat models need and each caller used to handle (or not) on its own:
- thinking mode off for templates that have one (Qwen3's ``enable_thinking``), as the research code does;
- templates without a system role (Gemma, Mistral's older ones): the system text opens the first user turn;
- a tokenizer with no chat template: a single user turn is used as plain text (base models), anything
  more is refused with a fix;
- reasoning-channel text kept out of recorded answers (``<think>…</think>``, gpt-oss's analysis channel).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

Messages = Sequence[Mapping[str, str]]


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
    """The conversation as the model's chat template writes it (a generation prompt opens the reply)."""
    messages = [dict(m) for m in messages]
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
        if not any(m.get("role") == "system" for m in messages) or "system" not in str(error).lower():
            raise
        return tokenizer.apply_chat_template(_fold_system_into_user(messages), **kwargs)


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
