"""The one LightningDataModule over (prompt, response) examples, and its file-reading form.

:class:`ExampleDataModule` takes examples already read; :class:`ResponseDataModule` reads them from
scored CSVs or contrastive pairs (its init arguments are the config schema of ``persona predict``).
Both tokenise once (cut to the model's context) and batch longest-first with right padding, by rows
(``batch_size``) or by padded tokens (``max_batch_tokens``), a row far longer than the rest alone; batches carry
``index`` = position in the examples, so predictions can be put back in input order.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, SequentialSampler

from persona.data.batches import LengthBatchSampler, collate, length_sorted, tokenize_examples
from persona.data.examples import Example, contrastive_pair_examples, scored_csv_examples
from persona.hooks.placement import batch_device
from persona.models import DEFAULT_MODEL, load_tokenizer


class ExampleDataModule(L.LightningDataModule):
    """Already-read examples, tokenised once, batched longest-first with right padding.

    ``max_batch_tokens``: instead of ``batch_size`` rows, as many rows as fit in this many padded tokens
    (rows x longest row): short examples go many to a batch, long ones few, so a GPU stays busy without
    running out of memory on the longest batch. Results are the same either way (tests).
    """

    def __init__(
        self,
        examples: list[Example],
        tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        max_batch_tokens: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} must be >= 1.")
        self.examples = examples
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens

    def load_examples(self) -> list[Example]:
        return self.examples

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        module = self.trainer.lightning_module if self.trainer is not None else None
        return super().transfer_batch_to_device(batch, batch_device(module, device), dataloader_idx)

    def setup(self, stage: str) -> None:
        examples = self.load_examples()
        self.items = length_sorted(tokenize_examples(examples, self.tokenizer, max_length=self.max_length))

    def predict_dataloader(self) -> DataLoader:
        lengths = [len(item.input_ids) for item in self.items]
        rows = self.batch_size if self.max_batch_tokens is None else None
        sampler = LengthBatchSampler(SequentialSampler(self.items), lengths, rows, self.max_batch_tokens)
        return DataLoader(
            self.items,
            batch_sampler=sampler,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
        )


class ResponseDataModule(ExampleDataModule):
    """Examples to read activations from, tokenised once, batched longest-first with right padding.

    Give either ``pos_path`` + ``neg_path`` (the generate step's CSVs, filtered as the seed does) or
    ``pairs_path`` (contrastive pairs JSONL, TRAIT items or persona statements).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pos_path: str | None = None,
        neg_path: str | None = None,
        trait: str | None = None,
        threshold: float = 50.0,
        no_filter: bool = False,
        pairs_path: str | None = None,
        split: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        max_batch_tokens: int | None = None,
    ):
        """
        Args:
            model: Model alias, hub id or local path (its tokenizer is used).
            pos_path: CSV of responses that show the trait (columns prompt, answer, <trait>, coherence).
            neg_path: CSV of responses that don't, row-aligned with pos_path.
            trait: Trait name, the score column of the CSVs.
            threshold: Keep pairs with pos score >= threshold and neg score < 100 - threshold.
            no_filter: Use every row (for CSVs without score columns).
            pairs_path: Contrastive pairs instead of CSVs: JSONL {prompt|messages, positive, negative[, split]}, TRAIT items, or persona statements.
            split: Only pairs with this ``split`` value (e.g. train); None for all.
            batch_size: Examples per forward pass.
            max_length: Cut prompt+response to this many tokens (default: the model's context), with a warning.
            trust_remote_code: Allow the tokenizer's custom code (off unless you trust the repository).
            max_batch_tokens: Batch by padded tokens (rows x longest row) instead of batch_size rows.
        """
        super().__init__(
            None, None, batch_size=batch_size, max_length=max_length, max_batch_tokens=max_batch_tokens
        )
        if pairs_path is None and (pos_path is None or neg_path is None):
            raise ValueError("Give pos_path and neg_path (scored CSVs) or pairs_path (contrastive pairs).")
        if pairs_path is None and trait is None and not no_filter:
            raise ValueError(
                "trait is required to filter scored CSVs. Fix: pass --trait NAME or --no_filter."
            )
        self.save_hyperparameters()

    def sources(self) -> list[str]:
        hp = self.hparams
        return [str(Path(p)) for p in (hp.pos_path, hp.neg_path, hp.pairs_path) if p is not None]

    def load_examples(self) -> list[Example]:
        """Read and validate the input (cheap; runs before any model is loaded)."""
        if self.examples is None:
            hp = self.hparams
            self.tokenizer = load_tokenizer(
                hp.model, padding_side="right", trust_remote_code=hp.trust_remote_code
            )
            if hp.pairs_path is not None:
                self.examples = contrastive_pair_examples(hp.pairs_path, self.tokenizer, split=hp.split)
            else:
                self.examples = scored_csv_examples(
                    hp.pos_path, hp.neg_path, hp.trait or "", threshold=hp.threshold, no_filter=hp.no_filter
                )
        return self.examples

    def counts(self) -> dict[str, int]:
        examples = self.load_examples()
        positives = sum(example.label for example in examples)
        return {"n_positive": positives, "n_negative": len(examples) - positives}
