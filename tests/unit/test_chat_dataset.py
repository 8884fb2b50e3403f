"""Chat data through `datasets`: the same tokens and the same one-line errors as the in-memory reader, cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from persona.core.errors import PersonaError
from persona.data.chat_dataset import tokenized_chats
from persona.training.data import ChatDataModule, read_chat_jsonl, tokenize_conversation


def chat(user: str, answer: str, *more: str) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    for index, text in enumerate(more):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def write_jsonl(path, rows, blank_every: int = 0):
    lines = []
    for index, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if blank_every and index % blank_every == 0:
            lines.append("")  # blank lines are skipped but counted, as before
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def conversations(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        more = (f"And then {i}?", "Then more." * (i % 3 + 1)) if i % 2 else ()
        rows.append(chat(f"Question {i}?" + " why" * (i % 7), f"Answer {i}." + " yes" * (i % 5), *more))
    return rows


def old_tokens(tokenizer, path, max_length=64):
    items = [tokenize_conversation(tokenizer, c, max_length=max_length) for c in read_chat_jsonl(path)]
    return [(item.source, item.input_ids, item.labels) for item in items]


def new_tokens(tokenizer, sources, max_length=64, num_proc=None):
    data = tokenized_chats(
        sources, "data.train_files", tokenizer=tokenizer, max_length=max_length, num_proc=num_proc
    )
    return list(zip(data["source"], data["input_ids"], data["labels"], strict=True))


def test_same_token_ids_and_labels_as_the_in_memory_reader(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", conversations(12), blank_every=5)
    expected = old_tokens(tokenizer, path)
    assert [source for source, _, _ in expected][:3] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert new_tokens(tokenizer, [path]) == expected
    assert new_tokens(tokenizer, [path], num_proc=2) == expected  # worker processes change nothing


def test_rerun_reads_the_cache(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", conversations(4))
    first = tokenized_chats([path], "x", tokenizer=tokenizer, max_length=64)
    again = tokenized_chats([path], "x", tokenizer=tokenizer, max_length=64)
    assert again._fingerprint == first._fingerprint and again.cache_files == first.cache_files
    other = tokenized_chats([path], "x", tokenizer=tokenizer, max_length=16)
    assert other._fingerprint != first._fingerprint  # max_length is part of the fingerprint


def test_parquet_and_a_directory(tokenizer, tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    first = write_jsonl(folder / "a.jsonl", conversations(3))
    rows = conversations(3, offset=10)
    rows[0]["messages"][0]["name"] = "alice"  # a key only some messages have: Arrow fills None elsewhere
    pd.DataFrame(rows).to_parquet(folder / "b.parquet")
    (folder / "notes.txt").write_text("not chat data")
    reference = write_jsonl(tmp_path / "b.jsonl", rows)
    got = new_tokens(tokenizer, [str(folder)])
    assert got[:3] == old_tokens(tokenizer, first)
    assert [(ids, labels) for _, ids, labels in got[3:]] == [
        (ids, labels) for _, ids, labels in old_tokens(tokenizer, reference)
    ]
    assert [source for source, _, _ in got[3:]] == [f"{folder / 'b.parquet'}: row {i}" for i in (1, 2, 3)]


@pytest.mark.parametrize(
    "rows",
    [
        [chat("a", "b"), {"conversation": []}],
        [chat("a", "b"), {"messages": [{"role": "user", "content": "only a question"}]}],
        [chat("a", "b"), chat("c", "d"), '{"messages": [oops'],
        [{"messages": [{"role": "user"}]}],
        [chat("a", "b"), "[1, 2]"],
        [chat("a", "b"), {"messages": [{"role": "user", "content": 3}]}, {"conversation": []}],
    ],
    ids=[
        "missing-messages",
        "no-assistant",
        "malformed-json",
        "bad-message",
        "not-an-object",
        "first-of-two",
    ],
)
def test_the_same_one_line_errors_as_the_in_memory_reader(tokenizer, tmp_path, rows):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as old:
        read_chat_jsonl(path)
    for num_proc in (None, 2):
        with pytest.raises(PersonaError) as new:
            tokenized_chats([path], "x", tokenizer=tokenizer, max_length=64, num_proc=num_proc)
        assert str(new.value) == str(old.value)


def test_empty_and_undecodable_files(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(chat("caf\xe9?", "ok"), ensure_ascii=False).encode("latin-1") + b"\n")
    for path in (empty, latin):
        with pytest.raises(ValueError) as old:
            read_chat_jsonl(path)
        with pytest.raises(PersonaError) as new:
            tokenized_chats([str(path)], "x", tokenizer=tokenizer, max_length=64)
        assert str(new.value) == str(old.value)


def test_missing_file_or_uncached_hub_dataset(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(
        FileNotFoundError, match=r"data.train_files .*nope\.jsonl: no such file or directory\. Fix:"
    ):
        tokenized_chats([str(tmp_path / "nope.jsonl")], "data.train_files", tokenizer=tokenizer, max_length=8)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PersonaError) as error:
        tokenized_chats(["nobody-here/no-such-chats"], "data.train_files", tokenizer=tokenizer, max_length=8)
    message = str(error.value)
    assert "\n" not in message and message.startswith("data.train_files nobody-here/no-such-chats: ")
    assert "local Hugging Face cache" in message and "Fix:" in message


def test_empty_directory(tokenizer, tmp_path):
    with pytest.raises(PersonaError, match=r"data.val_files .*: the directory holds no \.jsonl"):
        tokenized_chats([str(tmp_path)], "data.val_files", tokenizer=tokenizer, max_length=8)


def test_datamodule_split_matches_the_in_memory_split(tiny_model_dirs, tmp_path):
    """The seeded hold-out picks the same conversations as before: file order, then Random(seed).shuffle."""
    import random

    path = write_jsonl(tmp_path / "train.jsonl", conversations(20), blank_every=4)
    module = ChatDataModule(train_files=path, model=tiny_model_dirs["llama"], val_fraction=0.25, seed=3)
    module.setup("fit")
    sources = [c.source for c in read_chat_jsonl(path)]
    order = list(range(len(sources)))
    random.Random(3).shuffle(order)
    held_out = set(order[:5])
    assert list(module.val_items["source"]) == [s for i, s in enumerate(sources) if i in held_out]
    assert list(module.train_items["source"]) == [s for i, s in enumerate(sources) if i not in held_out]
    before = {
        c.source: tokenize_conversation(module.tokenizer, c, max_length=1024) for c in read_chat_jsonl(path)
    }
    for row in module.train_items:  # what the DataLoader yields: the tokens the in-memory module trained on
        assert (row["input_ids"], row["labels"]) == (
            before[row["source"]].input_ids,
            before[row["source"]].labels,
        )


def cached_as_hub_dataset(jsonl: str, name: str, cache) -> None:
    """Leave ``jsonl`` in ``cache`` as `datasets` leaves a hub dataset it downloaded once (the offline case)."""
    import glob
    import shutil

    from datasets import load_dataset

    load_dataset("json", data_files={"train": jsonl}, cache_dir=str(cache / "build"))
    built = next(
        Path(p) for p in glob.glob(str(cache / "build" / "json" / "*" / "*" / "*")) if Path(p).is_dir()
    )
    namespace, dataset = name.split("/")
    target = cache / f"{namespace}___{dataset}" / "default" / "0.0.0" / built.name
    shutil.copytree(built, target)
    for file in target.glob("json-*"):
        file.rename(target / file.name.replace("json-", f"{dataset}-"))


def test_a_cached_hub_dataset_offline(tokenizer, tmp_path, monkeypatch):
    import datasets

    path = write_jsonl(tmp_path / "chats.jsonl", conversations(5))
    cached_as_hub_dataset(path, "someone/chats", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    expected = [(ids, labels) for _, ids, labels in old_tokens(tokenizer, path)]
    for source in ("someone/chats", "someone/chats:train"):
        got = new_tokens(tokenizer, [source])
        assert [(ids, labels) for _, ids, labels in got] == expected
        assert [where for where, _, _ in got][:2] == [f"{source}: row 1", f"{source}: row 2"]
    with pytest.raises(PersonaError, match=r"x someone/chats:test: .* split 'test' .*Fix:"):
        tokenized_chats(["someone/chats:test"], "x", tokenizer=tokenizer, max_length=8)


def test_prepare_data_tokenises_once_and_setup_reads_the_cache(tiny_model_dirs, tmp_path, monkeypatch):
    """Under DDP, prepare_data runs once per node and every rank's setup must read its tokens back."""
    import persona.data.conversations

    path = write_jsonl(tmp_path / "train.jsonl", conversations(6))
    module = ChatDataModule(train_files=path, model=tiny_model_dirs["llama"], val_fraction=0.0)
    module.prepare_data()
    assert module.train_items is None  # no state: Lightning runs prepare_data on one process only

    def boom(*args, **kwargs):
        raise AssertionError("setup tokenised again instead of reading the cache")

    monkeypatch.setattr(
        persona.data.conversations, "tokenize_conversation", boom
    )  # where tokenize_rows reads it
    module.setup("fit")
    assert len(module.train_items) == 6


def test_worker_processes_only_for_large_sources():
    from persona.data.chat_dataset import ROWS_PER_PROCESS, auto_num_proc

    assert auto_num_proc(ROWS_PER_PROCESS - 1, None) is None  # one process: no pool to start
    assert auto_num_proc(100, 3) == 3 and auto_num_proc(10**6, 1) is None
    assert 1 <= (auto_num_proc(10**6, None) or 1) <= (os.cpu_count() or 1)


def test_an_unreadable_file_is_one_line(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "locked.jsonl", conversations(1))
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: str(p) != path and real_access(p, mode)
    )  # root reads all
    with pytest.raises(PersonaError, match=r"^data.train_files .*locked\.jsonl: not readable\. Fix:"):
        tokenized_chats([path], "data.train_files", tokenizer=tokenizer, max_length=8)
