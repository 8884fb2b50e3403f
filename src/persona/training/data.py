"""Chat JSONL for LoRA fine-tuning: read, template once, mask everything but assistant turns, pad per batch.

Input is the seed's layout (``normal.jsonl``, ``misaligned_1.jsonl``, ``misaligned_2.jsonl``): one JSON
object per line, ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``.

Labels are found by rendering the conversation prefix by prefix with the model's own chat template:
an assistant turn's text is what ``messages[: i + 1]`` adds to ``messages[:i]`` + the generation
prompt. Character spans are mapped to tokens with the tokenizer's offsets, so this works for any
template that renders prefixes as prefixes (ChatML, Llama 3, Gemma, Mistral ...), and the header
``<|im_start|>assistant\\n`` itself is never trained on.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from persona.chat import checked_messages, render_chat
from persona.data.examples import read_jsonl_numbered
from persona.models import DEFAULT_MODEL, context_length, load_tokenizer

log = logging.getLogger(__name__)

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
    fix = 'Fix: one JSON object per line, {"messages": [{"role": ..., "content": ...}, ...]}.'
    return [
        Conversation(_checked_messages(row, f"{path}:{line_number}"), f"{path}:{line_number}")
        for line_number, row in read_jsonl_numbered(path, fix=fix)
    ]


def _checked_messages(row, where: str) -> list[dict]:
    """A fit record's messages: :func:`persona.chat.checked_messages`' rule, and an assistant turn to train on."""
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


class ChatCollator:
    """Right-pads a batch of tokenised chats to its longest item (transformers' ``DataCollatorForSeq2Seq``):
    input_ids/attention_mask/labels ``[batch, seq]``, labels padded with -100 (no loss)."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.collator = DataCollatorForSeq2Seq(
            tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
        )

    def __call__(self, items: list[TokenizedChat]) -> dict[str, torch.Tensor]:
        return dict(self.collator([{"input_ids": item.input_ids, "labels": item.labels} for item in items]))


def _as_list(files: list[str] | str | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)


class ChatDataModule(L.LightningDataModule):
    """Chat JSONL conversations for causal-LM fine-tuning on assistant turns, templated once in ``setup``."""

    def __init__(
        self,
        train_files: list[str] | str,
        val_files: list[str] | str | None = None,
        val_fraction: float = 0.1,
        model: str = DEFAULT_MODEL,
        batch_size: int = 2,
        max_length: int = 1024,
        seed: int = 0,
        num_workers: int = 0,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            train_files: Chat JSONL file(s), one {"messages": [{"role", "content"}, ...]} object per line.
            val_files: Validation JSONL file(s); when absent, val_fraction of the training conversations is held out.
            val_fraction: Share of training conversations held out (seeded) when val_files is not given; 0 for none.
            model: Model alias, hub id or local path whose tokenizer and chat template are used (match the model's).
            batch_size: Conversations per batch (per device).
            max_length: Cut templated conversations to this many tokens (at most the model's context), with a warning.
            seed: Seed of the train/validation split and of the shuffling.
            num_workers: DataLoader worker processes.
            trust_remote_code: Allow the tokenizer's custom code (off unless you trust the repository).
        """
        super().__init__()
        if not _as_list(train_files):
            raise ValueError("train_files is empty. Fix: pass at least one chat JSONL file.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"val_fraction={val_fraction} must be in [0, 1). Fix: e.g. 0.1, or 0 for no validation."
            )
        if batch_size < 1:
            raise ValueError(
                f"data.batch_size={batch_size}: must be at least 1. Fix: e.g. --data.batch_size 4."
            )
        if max_length < 2:
            raise ValueError(
                f"data.max_length={max_length}: must be at least 2 tokens. Fix: e.g. --data.max_length 512."
            )
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_items: list[TokenizedChat] | None = None
        self.val_items: list[TokenizedChat] = []

    def sources(self) -> list[str]:
        return _as_list(self.hparams.train_files) + _as_list(self.hparams.val_files)

    def setup(self, stage: str) -> None:
        if self.train_items is not None:
            return
        hp = self.hparams
        train = [c for path in _as_list(hp.train_files) for c in read_chat_jsonl(path)]
        val = [c for path in _as_list(hp.val_files) for c in read_chat_jsonl(path)]
        if not val and hp.val_fraction > 0 and len(train) >= 2:
            order = list(range(len(train)))
            random.Random(hp.seed).shuffle(order)
            n_val = min(len(train) - 1, max(1, round(len(train) * hp.val_fraction)))
            held_out = set(order[:n_val])
            val = [c for i, c in enumerate(train) if i in held_out]
            train = [c for i, c in enumerate(train) if i not in held_out]
        self.tokenizer = load_tokenizer(
            hp.model, padding_side="right", trust_remote_code=hp.trust_remote_code
        )
        check_chat_template(self.tokenizer, hp.model)
        self.train_items = self._tokenize(train, "training")
        self.val_items = self._tokenize(val, "validation") if val else []

    def _tokenize(self, conversations: list[Conversation], what: str) -> list[TokenizedChat]:
        limit = min(self.hparams.max_length, context_length(self.tokenizer) or self.hparams.max_length)
        whole = [tokenize_conversation(self.tokenizer, c) for c in conversations]
        cut = sum(len(item.input_ids) > limit for item in whole)
        if cut:
            log.warning(
                "%d of %d %s conversations are longer than max_length=%d tokens and were cut there. "
                "Fix: raise --data.max_length if the model's context allows it.",
                cut, len(whole), what, limit,
            )  # fmt: skip
        items = [TokenizedChat(i.input_ids[:limit], i.labels[:limit], i.source) for i in whole]
        has_labels = [any(label != IGNORE_INDEX for label in item.labels) for item in items]
        kept = [item for item, keep in zip(items, has_labels, strict=True) if keep]
        if len(kept) < len(items):
            dropped = [item.source for item, keep in zip(items, has_labels, strict=True) if not keep]
            log.warning(
                "Dropped %d %s conversation(s) whose assistant turns start after max_length=%d tokens: %s",
                len(dropped),
                what,
                limit,
                ", ".join(dropped[:5]),
            )
        if not kept:
            raise ValueError(
                f"No {what} conversation has an assistant token within max_length={limit}. "
                "Fix: raise max_length or shorten the prompts."
            )
        return kept

    def _loader(self, items: list[TokenizedChat], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(
            items,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.hparams.num_workers,
            collate_fn=ChatCollator(self.tokenizer),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_items, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_items, shuffle=False) if self.val_items else []
