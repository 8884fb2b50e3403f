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

import lightning as L
import torch
from torch.utils.data import DataLoader

from persona.data.conversations import (
    IGNORE_INDEX,
    Conversation,
    TokenizedChat,
    assistant_char_spans,
    check_chat_template,
    read_chat_jsonl,
    tokenize_conversation,
)
from persona.models import DEFAULT_MODEL, context_length, load_tokenizer

log = logging.getLogger(__name__)


class ChatCollator:
    """Right-pads a batch of tokenised chats (:class:`TokenizedChat` or rows with ``input_ids`` and ``labels``) to
    its longest item (transformers' ``DataCollatorForSeq2Seq``): input_ids/attention_mask/labels ``[batch, seq]``,
    labels padded with -100 (no loss)."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.collator = DataCollatorForSeq2Seq(
            tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
        )

    def __call__(self, items: list[TokenizedChat | dict]) -> dict[str, torch.Tensor]:
        rows = [vars(item) if isinstance(item, TokenizedChat) else item for item in items]
        return dict(self.collator([{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows]))


def _as_list(files: list[str] | str | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)


class ChatDataModule(L.LightningDataModule):
    """Chat conversations for causal-LM fine-tuning on assistant turns, tokenised in ``setup`` with ``datasets``
    (cached: an unchanged file with the same tokenizer and max_length is read back, not tokenised again)."""

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
        num_proc: int | None = None,
    ):
        """
        Args:
            train_files: Chat data: JSONL file(s) with one {"messages": [{"role", "content"}, ...]} object per line,
                Parquet file(s) with a messages column, directories of them, or hub dataset ids (org/name, or
                org/name:split for a split other than train; offline, from the local cache).
            val_files: Validation data in the same forms; when absent, val_fraction of the training conversations is held out.
            val_fraction: Share of training conversations held out (seeded) when val_files is not given; 0 for none.
            model: Model alias, hub id or local path whose tokenizer and chat template are used (match the model's).
            batch_size: Conversations per batch (per device).
            max_length: Cut templated conversations to this many tokens (at most the model's context), with a warning.
            seed: Seed of the train/validation split and of the shuffling.
            num_workers: DataLoader worker processes.
            trust_remote_code: Allow the tokenizer's custom code (off unless you trust the repository).
            num_proc: Processes that tokenise; default one per 4000 conversations, at most one per CPU.
        """
        super().__init__()
        if not _as_list(train_files):
            raise ValueError("train_files is empty. Fix: pass at least one chat JSONL file.")
        if num_proc is not None and num_proc < 1:
            raise ValueError(
                f"data.num_proc={num_proc}: must be at least 1. Fix: e.g. --data.num_proc 4, or leave it out."
            )
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
        self.train_items = None  # datasets.Dataset: input_ids, labels, source, n_trained
        self.val_items = None

    def sources(self) -> list[str]:
        return _as_list(self.hparams.train_files) + _as_list(self.hparams.val_files)

    def prepare_data(self) -> None:
        # One process per node, before any rank's setup: the tokens land in datasets' cache once, and every rank's
        # setup reads them back instead of N ranks tokenising the same data at once.
        tokenizer = self._checked_tokenizer()
        for files, flag in (
            (self.hparams.train_files, "data.train_files"),
            (self.hparams.val_files, "data.val_files"),
        ):
            if _as_list(files):
                self._tokenized(files, flag, tokenizer)

    def setup(self, stage: str) -> None:
        if self.train_items is not None:
            return
        hp = self.hparams
        self.tokenizer = self._checked_tokenizer()
        train = self._tokenized(hp.train_files, "data.train_files", self.tokenizer)
        val = (
            self._tokenized(hp.val_files, "data.val_files", self.tokenizer)
            if _as_list(hp.val_files)
            else None
        )
        if val is None and hp.val_fraction > 0 and len(train) >= 2:
            kept, held_out = held_out_split(len(train), hp.val_fraction, hp.seed)
            train, val = train.select(kept), train.select(held_out)
        self.train_items = self._with_labels(train, "training")
        self.val_items = self._with_labels(val, "validation") if val is not None else None

    def _checked_tokenizer(self):
        hp = self.hparams
        tokenizer = load_tokenizer(hp.model, padding_side="right", trust_remote_code=hp.trust_remote_code)
        check_chat_template(tokenizer, hp.model)
        return tokenizer

    def _limit(self, tokenizer) -> int:
        """``max_length``, or the model's context when that is shorter."""
        return min(self.hparams.max_length, context_length(tokenizer) or self.hparams.max_length)

    def _tokenized(self, files, flag: str, tokenizer):
        from persona.data.chat_dataset import tokenized_chats

        return tokenized_chats(
            _as_list(files),
            flag,
            tokenizer=tokenizer,
            max_length=self._limit(tokenizer),
            num_proc=self.hparams.num_proc,
        )

    def _with_labels(self, items, what: str):
        """The conversations with at least one assistant token within the limit (the others are dropped); the cut
        ones counted in one warning."""
        limit = self._limit(self.tokenizer)
        cut = sum(n > limit for n in items["n_tokens"])
        if cut:
            log.warning(
                "%d of %d %s conversations are longer than max_length=%d tokens and were cut there. "
                "Fix: raise --data.max_length if the model's context allows it.",
                cut, len(items), what, limit,
            )  # fmt: skip
        trained = list(items["n_trained"])
        kept = [index for index, count in enumerate(trained) if count > 0]
        if len(kept) < len(items):
            sources = list(items["source"])
            dropped = [sources[index] for index, count in enumerate(trained) if count == 0]
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
        items = items.select(kept) if len(kept) < len(items) else items
        return items.select_columns(["input_ids", "labels", "source"])

    def _loader(self, items, shuffle: bool) -> DataLoader:
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
        return self._loader(self.val_items, shuffle=False) if self.val_items is not None else []


def held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) row indices, each in file order: a seeded ``fraction`` (at least 1, never all) held out."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * fraction)))
    held_out = set(order[:n_val])
    return [i for i in range(n) if i not in held_out], sorted(held_out)


__all__ = [  # the tokenisation lives in persona.data.conversations; users import it from here too
    "IGNORE_INDEX",
    "ChatCollator",
    "ChatDataModule",
    "Conversation",
    "TokenizedChat",
    "assistant_char_spans",
    "check_chat_template",
    "held_out_split",
    "read_chat_jsonl",
    "tokenize_conversation",
]
