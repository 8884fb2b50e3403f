"""Fine-tuning losses: a batch's loss with logits only where a label reads them (:func:`causal_lm_loss`), and a
run's final losses, read by the study as the cost of an intervention (:class:`FinalLosses`)."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from persona.data.conversations import IGNORE_INDEX
from persona.models.logits import logits_at, predicting_positions


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token cross-entropy over the labelled tokens, as the model's own ``labels`` loss, with the
    LM head run only at positions whose next token is labelled in some row (:func:`persona.models.logits_at`;
    tested against the ``labels`` path on every tiny architecture)."""
    targets = batch["labels"][:, 1:]
    positions = predicting_positions(targets != IGNORE_INDEX)
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], positions)
    return nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, positions].flatten(), ignore_index=IGNORE_INDEX
    )


class FinalLosses(Callback):
    """The last training epoch's loss (token-weighted over its batches, as HF averages within one) and the
    validation loss after it: the cost column of the study's intervention arms."""

    def __init__(self):
        self.train_loss = self.val_loss = math.nan
        self._sum = self._tokens = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sum = self._tokens = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        tokens = float(
            (batch["labels"][:, 1:] != -100).sum()
        )  # the positions HF's shifted loss averages over
        self._sum += float(loss.detach()) * tokens
        self._tokens += tokens

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._tokens:
            self.train_loss = self._sum / self._tokens

    def on_train_end(self, trainer, pl_module) -> None:
        # Read here, not at validation epoch end: Lightning fills callback_metrics after the callbacks' hooks.
        if "val_loss" in trainer.callback_metrics:
            self.val_loss = float(trainer.callback_metrics["val_loss"])
