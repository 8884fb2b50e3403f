"""Judge-free trait score: how much more likely the model finds trait-positive responses than negative ones.

For each (prompt, response) example, the mean log-probability per response token under teacher
forcing. The score of a set of pairs is the mean over pairs of ``logp(positive) - logp(negative)``;
steering with a persona vector should raise it monotonically with the coefficient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from persona.core.hardware import input_device
from persona.data.batches import bounded_batches, collate, length_sorted, tokenize_examples
from persona.data.examples import Example
from persona.models.logits import logits_at, predicting_positions


@torch.no_grad()
def response_mean_logprobs(
    model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8
) -> torch.Tensor:
    """Mean log-probability per response token of each example: [len(examples)] in input order."""
    items = length_sorted(tokenize_examples(list(examples), tokenizer))
    lengths = [len(item.input_ids) for item in items]
    out = torch.empty(len(items))
    device = input_device(model)
    for rows in bounded_batches(range(len(items)), lengths, max_rows=batch_size):
        batch = collate([items[row] for row in rows], pad_token_id=tokenizer.pad_token_id)
        mask = batch["response_mask"][:, 1:].to(device)  # position t predicts token t+1
        positions = predicting_positions(mask.bool())  # the head runs at response tokens only
        input_ids = batch["input_ids"].to(device)
        logits = logits_at(model, input_ids, batch["attention_mask"].to(device), positions).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = input_ids[:, 1:][:, positions]
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = mask[:, positions]
        per_example = (token_logprobs * mask).sum(1) / mask.sum(1).clamp_min(1)
        out[batch["index"]] = per_example.cpu()
    return out


def pair_preference(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8) -> torch.Tensor:
    """``logp(positive) - logp(negative)`` per pair; examples alternate positive, negative (as pairs load)."""
    positives = [e for e in examples if e.label == 1]
    negatives = [e for e in examples if e.label == 0]
    if len(positives) != len(negatives):
        raise ValueError(
            f"pair_preference needs pairs: {len(positives)} positive vs {len(negatives)} negative examples."
        )
    scores = response_mean_logprobs(model, tokenizer, positives + negatives, batch_size=batch_size)
    return scores[: len(positives)] - scores[len(positives) :]
