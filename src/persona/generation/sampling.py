"""One token from one row's logits with that row's own generator: the draw every per-request sampler makes.

The continuous-batching engine and the static server's per-row sampler (``persona.serve.sampling.RowSampler``)
both draw through it, so a seeded request gets the same token from either. Nothing here reads a value back to
the host, so a GPU step is not stalled once per sampled row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """logits [vocab] with everything outside the smallest set of tokens holding ``top_p`` of the mass at -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """One token (a 0-d tensor) from logits [vocab]; non-finite rows (a runaway push) fall back to the argmax."""
    scaled = torch.nan_to_num(logits.float() / temperature, nan=float("-inf"), posinf=float("-inf"))
    scaled = top_p_filter(scaled, top_p)
    fallback = torch.nan_to_num(logits.float(), nan=float("-inf")).argmax()
    certain = torch.zeros_like(scaled).scatter_(0, fallback[None], 1.0)
    probs = torch.where(torch.isfinite(scaled).any(), scaled.softmax(dim=-1), certain)
    return torch.multinomial(probs, 1, generator=generator)[0]
