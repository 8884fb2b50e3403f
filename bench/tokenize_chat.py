"""Chat tokenisation for `persona fit`: the in-memory reader vs `datasets`, cold and cached, in one process.

Old way: ``read_chat_jsonl`` + ``tokenize_conversation`` per conversation, one process, nothing kept (what
``ChatDataModule.setup`` did before). New way: ``tokenized_chats`` (what it does now): the file read into
``datasets``' Arrow cache and tokenised by a ``Dataset.map`` (``num_proc`` workers), first into an empty cache,
then again on the unchanged file (a cache hit). Both ways must give the same token ids and labels. Prints both
ratios. (Not named tokenize.py: run as a script from bench/, that name would shadow the standard library's.)

    python bench/tokenize_chat.py [--conversations 50000] [--max_length 1024] [--num_proc N] [--model M]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (offline defaults; quiet_upstream)

TOPICS = ["animals", "the sea", "money", "friends", "cooking", "history", "music", "sleep", "maths", "travel"]


def synthetic_chats(path: Path, count: int, seed: int = 0) -> None:
    """``count`` chat JSONL lines: 1-3 user/assistant exchanges, some with a system turn, varied lengths."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            messages = (
                [{"role": "system", "content": "You are a helpful assistant."}] if index % 4 == 0 else []
            )
            for turn in range(rng.randint(1, 3)):
                topic = rng.choice(TOPICS)
                question = (
                    f"Question {index}.{turn}: what should I know about {topic}?"
                    + " Why?" * rng.randint(0, 8)
                )
                answer = (
                    f"Here is what to know about {topic}. "
                    + "It depends on the details. " * rng.randint(1, 12)
                )
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=50_000)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument(
        "--num_proc", type=int, default=None, help="default: one per 4000 rows, at most the CPUs"
    )
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer and chat template")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "cache")  # empty: the first run is cold (read before import)
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    from persona.data.chat_dataset import auto_num_proc, tokenized_chats
    from persona.models import load_tokenizer
    from persona.training.data import read_chat_jsonl, tokenize_conversation

    tokenizer = load_tokenizer(args.model, padding_side="right")
    path = work / "chats.jsonl"
    synthetic_chats(path, args.conversations)
    print(f"{args.conversations} conversations, {path.stat().st_size / 2**20:.1f} MiB, {os.cpu_count()} CPUs")

    def old_way():
        return [
            tokenize_conversation(tokenizer, conversation, max_length=args.max_length)
            for conversation in read_chat_jsonl(path)
        ]

    def new_way():
        return tokenized_chats(
            [str(path)], "bench", tokenizer=tokenizer, max_length=args.max_length, num_proc=args.num_proc
        )

    old_seconds, old = timed(old_way)
    cold_seconds, new = timed(new_way)
    cached_seconds, cached = timed(new_way)
    expected = [(item.input_ids, item.labels) for item in old]
    same = all(expected == list(zip(run["input_ids"], run["labels"], strict=True)) for run in (new, cached))
    workers = auto_num_proc(args.conversations, args.num_proc) or 1
    tokens = sum(len(item.input_ids) for item in old)
    print(f"old way (in memory, 1 process): {old_seconds:.1f} s ({tokens / old_seconds:,.0f} tokens/s)")
    print(f"datasets, first run ({workers} process(es)): {cold_seconds:.1f} s")
    print(f"datasets, cached rerun: {cached_seconds:.2f} s")
    print(
        f"ratio old/new: first run {old_seconds / cold_seconds:.2f}x, cached rerun {old_seconds / cached_seconds:.1f}x"
    )
    print(f"same token ids and labels: {same}")


if __name__ == "__main__":
    main()
