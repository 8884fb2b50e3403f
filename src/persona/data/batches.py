"""Tokenise (prompt, response) examples once and collate them into right-padded batches with masks."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import BatchSampler

from persona.data.examples import Example
from persona.models import context_length

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    prompt_len: int
    label: int
    index: int  # position in the source list, so results can be put back in order


def tokenize_examples(
    examples: list[Example], tokenizer, *, max_length: int | None = None
) -> list[TokenizedExample]:
    """Prompt and response are tokenised separately (each once) and concatenated.

    Chat templates end the prompt with a newline or a special token, so this equals tokenising
    ``prompt + response`` as the seed does, while giving the prompt length without a second pass.
    ``max_length`` None means the model's context (:func:`persona.models.context_length`); longer examples are
    cut, with one warning line that counts them.
    """
    max_length = max_length or context_length(tokenizer)
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    out = []
    for index, (example, prompt_ids, response_ids) in enumerate(
        zip(examples, prompts, responses, strict=True)
    ):
        if not prompt_ids:
            raise ValueError(f"{example.example_id}: empty prompt.")
        ids = prompt_ids + response_ids
        if max_length is not None:
            ids = ids[:max_length]
        out.append(TokenizedExample(ids, min(len(prompt_ids), len(ids)), example.label, index))
    cut = (
        sum(len(p) + len(r) > max_length for p, r in zip(prompts, responses, strict=True))
        if max_length
        else 0
    )
    if cut:
        log.warning(
            "%d of %d examples are longer than max_length=%d tokens and were cut there (the rest of their "
            "response is not read). Fix: pass a larger --max_length if the model's context allows it.",
            cut,
            len(examples),
            max_length,
        )
    return out


def length_sorted(items: list[TokenizedExample]) -> list[TokenizedExample]:
    """Longest first: batches of similar lengths waste little on padding, and memory peaks up front."""
    return sorted(items, key=lambda item: -len(item.input_ids))


# No row of a batch is padded past this many times its own length.
PADDING_SLACK = 2


def bounded_batches(
    order: Iterable[int],
    lengths: Sequence[int],
    *,
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> Iterator[list[int]]:
    """Consecutive indices of ``order`` (longest first, see :func:`length_sorted`) grouped into batches.

    A batch closes at ``max_rows`` rows, when its padded size (rows x longest) would pass ``max_tokens``, or
    before a row that would be padded past :data:`PADDING_SLACK` times its length: a row far longer than the rest
    runs alone instead of padding every row beside it to its length. A row over ``max_tokens`` runs alone.
    """
    batch: list[int] = []
    longest = shortest = 0
    for index in order:
        length = lengths[index]
        width, narrowest = max(longest, length), (min(shortest, length) if batch else length)
        if batch and (
            (max_rows is not None and len(batch) >= max_rows)
            or (max_tokens is not None and width * (len(batch) + 1) > max_tokens)
            or width > PADDING_SLACK * narrowest
        ):
            yield batch
            batch, width, narrowest = [], length, length
        batch.append(index)
        longest, shortest = width, narrowest
    if batch:
        yield batch


class LengthBatchSampler(BatchSampler):
    """:func:`bounded_batches` over ``sampler``'s order: ``batch_size`` rows, or ``max_batch_tokens`` padded tokens.

    Items come longest first (:func:`length_sorted`), so the first row of a batch is its longest. A
    ``BatchSampler`` with ``sampler`` and ``drop_last`` arguments, so Lightning can hand it each rank's share under
    DDP (its distributed sampler keeps the order, so every rank's batches stay sorted).
    """

    def __init__(
        self,
        sampler: Iterable[int],
        lengths: Sequence[int],
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        drop_last: bool = False,
    ):
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1.")
        super().__init__(sampler, batch_size=1, drop_last=drop_last)
        self.max_rows, self.max_batch_tokens = batch_size, max_batch_tokens
        self.lengths = list(lengths)

    def __iter__(self) -> Iterator[list[int]]:
        return bounded_batches(
            self.sampler, self.lengths, max_rows=self.max_rows, max_tokens=self.max_batch_tokens
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)


def collate(items: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/attention_mask/prompt_mask/response_mask [batch, seq], last_prompt_index/labels/index [batch]."""
    width = max(len(item.input_ids) for item in items)
    batch = len(items)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    positions = torch.arange(width)
    lengths = torch.tensor([len(item.input_ids) for item in items])
    prompt_lens = torch.tensor([item.prompt_len for item in items])
    for row, item in enumerate(items):
        input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
    attention_mask = positions < lengths[:, None]
    prompt_mask = positions < prompt_lens[:, None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask.long(),
        "prompt_mask": prompt_mask,
        "response_mask": attention_mask & ~prompt_mask,
        "last_prompt_index": prompt_lens - 1,
        "labels": torch.tensor([item.label for item in items]),
        "index": torch.tensor([item.index for item in items]),
    }


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists -> (input_ids [batch, width], attention_mask [batch, width])."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask
