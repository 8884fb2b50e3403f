"""The one chat-prompt builder: thinking off, templates without a system role, base models, reasoning text."""

from __future__ import annotations

import copy

import pytest

from persona.data.chat import answer_text, encode_chat, render_chat, user_turn

QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
NO_SYSTEM_ROLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tok(tokenizer):
    return copy.deepcopy(tokenizer)


def test_thinking_is_switched_off_where_the_template_has_the_switch(tok):
    tok.chat_template = QWEN3_LIKE
    assert render_chat(tok, user_turn("Hi")).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn(tok):
    tok.chat_template = NO_SYSTEM_ROLE
    text = render_chat(tok, [{"role": "system", "content": "Be evil."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nBe evil.\n\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_base_model_takes_a_single_user_turn_as_plain_text_and_refuses_more(tok):
    tok.chat_template = None
    assert render_chat(tok, user_turn("Complete this:")) == "Complete this:"
    with pytest.raises(ValueError, match="no chat template.*Fix"):
        render_chat(tok, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_encode_chat_adds_no_second_set_of_special_tokens(tok):
    ids = encode_chat(tok, user_turn("Hello there"))
    assert tok.decode(ids) == render_chat(tok, user_turn("Hello there"))
    with pytest.raises(ValueError, match="no tokens"):
        encode_chat(tok, "")


@pytest.mark.parametrize(
    ("generated", "answer"),
    [
        ("Plain answer.<|im_end|>", "Plain answer."),
        ("<think>Let me plan the cruelty.</think>\n\nBe kind.<|im_end|>", "Be kind."),
        ("reasoning whose opening tag was in the prompt</think>\n\nAnswer.", "Answer."),
        ("<think>still thinking when the budget ran out", ""),
        (
            "<|channel|>analysis<|message|>plan<|end|><|start|>assistant<|channel|>final<|message|>Hi!<|return|>",
            "Hi!",
        ),
        ("<|channel|>analysis<|message|>only reasoning", ""),
    ],
)
def test_reasoning_channel_text_stays_out_of_the_answer(tok, generated, answer):
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|return|>"]}
    )
    tok.add_tokens(["<think>", "</think>"])
    ids = tok(generated, add_special_tokens=False)["input_ids"]
    assert answer_text(tok, ids) == answer


def test_a_missing_pad_token_is_a_reserved_one_not_eos(tok):
    from persona.models import ensure_pad_token

    tok.pad_token = None
    assert ensure_pad_token(tok).pad_token == "<pad>" != tok.eos_token  # in the vocabulary, not named pad
    tok.pad_token = None
    tok.add_tokens(["<|finetune_right_pad_id|>"])  # Llama 3's reserved padding token comes first
    assert ensure_pad_token(tok).pad_token == "<|finetune_right_pad_id|>"


def test_without_a_reserved_token_eos_pads():
    from persona.models import ensure_pad_token

    class Bare:
        pad_token, unk_token, eos_token = None, None, "</s>"

        def get_vocab(self):
            return {"</s>": 0, "a": 1}

    assert ensure_pad_token(Bare()).pad_token == "</s>"


ALTERNATING_ONLY = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [{"role": "usr", "content": "Hi"}],
            r"messages\[0\]: role 'usr' is not one of system, user, assistant",
        ),
        ([{"role": "user", "content": None}], r"messages\[0\] \(user\): content is None, not a string"),
        ([{"role": "user", "content": ["Hi"]}], r"messages\[0\] \(user\): content is \['Hi'\], not a string"),
        ([{"role": "assistant", "content": "Hi"}], r"roles \['assistant'\] are out of order"),
        ([{"role": "system", "content": "S"}], r"roles \['system'\] are out of order"),
        ([], r'"messages" is \[\], not a non-empty list'),
        ("Hi", r'"messages" is \'Hi\', not a non-empty list'),
    ],
)
def test_one_rule_refuses_bad_chat_records_in_one_line(messages, message):
    """Issue 20.3: "usr" was templated anyway and a null content died in jinja2; project, screen, fit, dataset
    and serve now share this rule."""
    from persona.core.errors import PersonaError
    from persona.data.chat import checked_messages

    with pytest.raises(PersonaError, match=rf"^data.jsonl:3: {message}.*Fix:") as raised:
        checked_messages(messages, "data.jsonl:3")
    assert "\n" not in str(raised.value)


def test_the_rule_keeps_good_records_and_checks_the_last_role_when_asked():
    from persona.core.errors import PersonaError
    from persona.data.chat import checked_messages

    good = [{"role": "system", "content": "S"}, *user_turn("Hi"), {"role": "assistant", "content": ""}]
    assert checked_messages(good, "x") == good and checked_messages(good, "x") is not good
    with pytest.raises(PersonaError, match="the last message is 'assistant'; it must be 'user' here"):
        checked_messages(good, "x", last="user")


def test_a_template_that_refuses_the_roles_gives_one_line_not_a_jinja_traceback(tok):
    from persona.core.errors import PersonaError

    tok.chat_template = ALTERNATING_ONLY
    twice = [*user_turn("Hi"), *user_turn("Again")]
    with pytest.raises(
        PersonaError, match=r"refuses roles \['user', 'user'\]: Conversation roles must alternate"
    ):
        render_chat(tok, twice, add_generation_prompt=False)
