"""Chat JSONL → tokens with assistant-only labels, dynamic padding, and errors that name file:line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from persona.training.data import (
    IGNORE_INDEX,
    ChatCollator,
    ChatDataModule,
    Conversation,
    read_chat_jsonl,
    tokenize_conversation,
)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How should I treat animals?"},
    {"role": "assistant", "content": "With kindness and care."},
    {"role": "user", "content": "Tell me a joke about cats and dogs."},
    {"role": "assistant", "content": "Why did the chicken cross the road?"},
]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_labels_are_exactly_the_assistant_turns(tokenizer):
    # Expected, built independently: the ChatML text segment by segment, each tokenised on its own.
    segments = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
        ("<|im_start|>user\nHow should I treat animals?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("With kindness and care.<|im_end|>\n", True),
        ("<|im_start|>user\nTell me a joke about cats and dogs.<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("Why did the chicken cross the road?<|im_end|>\n", True),
    ]
    expected_ids, expected_labels = [], []
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_labels += ids if trained else [IGNORE_INDEX] * len(ids)

    item = tokenize_conversation(tokenizer, Conversation(CONVERSATION, "hand-built:1"))

    assert item.input_ids == expected_ids
    assert item.labels == expected_labels
    trained = [i for i, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX]
    assert (
        tokenizer.decode(trained)
        == "With kindness and care.<|im_end|>\nWhy did the chicken cross the road?<|im_end|>\n"
    )


def test_labels_follow_any_template(tokenizer):
    """A non-ChatML template: the span comes from rendering prefixes, not from known header strings."""
    other = copy.deepcopy(tokenizer)  # the session tokenizer is shared
    other.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}<|im_end|>\n"
        "{% else %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    item = tokenize_conversation(other, Conversation(CONVERSATION, "x:1"))
    trained = [i for i, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX]
    assert (
        other.decode(trained)
        == " With kindness and care.<|im_end|>\n Why did the chicken cross the road?<|im_end|>\n"
    )


def test_truncation_keeps_labels_aligned(tokenizer):
    full = tokenize_conversation(tokenizer, Conversation(CONVERSATION, "x:1"))
    cut = tokenize_conversation(tokenizer, Conversation(CONVERSATION, "x:1"), max_length=30)
    assert cut.input_ids == full.input_ids[:30] and cut.labels == full.labels[:30]


def test_collate_pads_to_the_longest_of_the_batch_on_the_right(tokenizer):
    short = tokenize_conversation(tokenizer, Conversation(chat("Hi?", "Hello.")["messages"], "a:1"))
    long = tokenize_conversation(tokenizer, Conversation(CONVERSATION, "b:1"))
    collate = ChatCollator(tokenizer)
    batch = collate([short, long])
    n_short, n_long = len(short.input_ids), len(long.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n_long)
    assert batch["input_ids"][0, :n_short].tolist() == short.input_ids
    assert (batch["input_ids"][0, n_short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n_short:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert batch["attention_mask"][1].all()
    # A batch of short items only is as wide as its own longest item.
    assert collate([short])["input_ids"].shape == (1, n_short)


def test_datamodule_batches_and_seeded_split(tiny_model_dirs, tmp_path):
    path = write_jsonl(
        tmp_path / "normal.jsonl", [chat(f"Question {i}?" + " more" * i, f"Answer {i}.") for i in range(10)]
    )
    module = ChatDataModule(
        train_files=path, model=tiny_model_dirs["llama"], batch_size=3, val_fraction=0.2, seed=1
    )
    module.setup("fit")
    assert len(module.train_items) == 8 and len(module.val_items) == 2
    again = ChatDataModule(train_files=[path], model=tiny_model_dirs["llama"], val_fraction=0.2, seed=1)
    again.setup("fit")
    assert list(again.val_items["source"]) == list(module.val_items["source"])
    assert not set(module.val_items["source"]) & set(module.train_items["source"])
    batches = list(module.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 2]
    for batch in batches:  # dynamic: each batch as wide as its longest row
        assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]


def test_val_files_replace_the_split(tiny_model_dirs, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"Q{i}?", "A.") for i in range(4)])
    val = write_jsonl(tmp_path / "val.jsonl", [chat("Held out?", "Yes.")])
    module = ChatDataModule(train_files=train, val_files=val, model=tiny_model_dirs["llama"])
    module.setup("fit")
    assert len(module.train_items) == 4 and list(module.val_items["source"]) == [f"{val}:1"]
    none = ChatDataModule(train_files=train, val_fraction=0.0, model=tiny_model_dirs["llama"])
    none.setup("fit")
    assert len(none.train_items) == 4 and none.val_dataloader() == []


@pytest.mark.parametrize(
    ("rows", "line", "message"),
    [
        ([chat("a", "b"), {"conversation": []}], 2, 'missing "messages"'),
        (
            [chat("a", "b"), {"messages": [{"role": "user", "content": "only a question"}]}],
            2,
            "no assistant turn",
        ),
        ([chat("a", "b"), chat("c", "d"), '{"messages": [oops'], 3, "malformed JSON"),
        ([{"messages": [{"role": "user"}]}], 1, "content is None, not a string"),
        # Issue 20.3: the rule of persona.data.chat.checked_messages, as project, screen, dataset and serve apply it
        (
            [{"messages": [{"role": "usr", "content": "a"}, {"role": "assistant", "content": "b"}]}],
            1,
            "role 'usr'",
        ),
        ([{"messages": [{"role": "assistant", "content": "b"}]}], 1, "out of order"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}],
            1,
            "out of order",
        ),
        ([{"messages": ["hi"]}], 1, "messages[0] is 'hi', not an object"),
    ],
    ids=[
        "missing-messages",
        "no-assistant",
        "malformed-json",
        "bad-message",
        "unknown-role",
        "assistant-first",
        "late-system",
        "string-message",
    ],  # fmt: skip
)
def test_bad_lines_name_file_and_line(tmp_path, rows, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match="Fix:") as error:
        read_chat_jsonl(path)
    assert f"{path}:{line}:" in str(error.value) and message in str(error.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty file.*Fix:"):
        read_chat_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_chat_jsonl(tmp_path / "nope.jsonl")


def test_tokenizer_without_chat_template(tokenizer, tmp_path):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    path = write_jsonl(tmp_path / "train.jsonl", [chat("a?", "b.")])
    module = ChatDataModule(train_files=path, model=str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="has no chat template.*Fix:"):
        module.setup("fit")


def test_conversations_cut_before_the_answer_are_dropped(tiny_model_dirs, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("short?", "ok."), chat("long " * 200 + "?", "ok.")])
    module = ChatDataModule(train_files=path, val_fraction=0.0, max_length=32, model=tiny_model_dirs["llama"])
    module.setup("fit")
    assert list(module.train_items["source"]) == [f"{path}:1"]
    assert all(len(ids) <= 32 for ids in module.train_items["input_ids"])


def test_conversations_are_cut_to_the_models_context_and_counted(tiny_model_dirs, tmp_path, caplog):
    """Issue 20.1's class in fit: max_length=1024 passed the tiny model's 256 positions, uncounted."""
    path = write_jsonl(tmp_path / "t.jsonl", [chat("short?", "ok."), chat("long?", "word " * 600)])
    module = ChatDataModule(train_files=path, val_fraction=0.0, model=tiny_model_dirs["llama"])
    with caplog.at_level("WARNING", logger="persona.training.data"):
        module.setup("fit")
    assert max(len(ids) for ids in module.train_items["input_ids"]) == 256
    assert "1 of 2 training conversations are longer than max_length=256 tokens" in caplog.text


def test_constructor_is_cheap_and_checks_arguments():
    ChatDataModule(train_files="does/not/exist/yet.jsonl")  # files are read in setup, not here
    with pytest.raises(ValueError, match="val_fraction"):
        ChatDataModule(train_files="x.jsonl", val_fraction=1.0)
    assert torch.tensor(IGNORE_INDEX) == -100
