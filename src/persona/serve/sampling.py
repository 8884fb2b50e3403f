"""Per-row token choice inside one ``generate`` call: each row its own temperature, top_p, seed and min_tokens.

``generate`` takes one sampling setting per call, so it runs greedy and this logits processor decides
sampled rows itself: it draws the token with the row's own ``torch.Generator`` and leaves only that token
finite, which greedy selection then picks. A seeded request therefore gets the same reply whatever
else shares its batch. Greedy rows (temperature 0) pass through untouched.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LogitsProcessor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0  # end-of-sequence tokens are masked until this many tokens were generated


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """logits [vocab] with everything outside the smallest set of tokens holding ``top_p`` of the mass at -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = (
        cumulative - sorted_logits.softmax(dim=-1) >= top_p
    )  # mass before this token already >= top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """One token (a 0-d tensor) from logits [vocab]; non-finite rows (a runaway steering push) fall back to the argmax.

    Nothing here reads a value back to the host, so a GPU step is not stalled once per sampled row.
    """
    scaled = torch.nan_to_num(logits.float() / temperature, nan=float("-inf"), posinf=float("-inf"))
    scaled = top_p_filter(scaled, top_p)
    fallback = torch.nan_to_num(logits.float(), nan=float("-inf")).argmax()
    certain = torch.zeros_like(scaled).scatter_(0, fallback[None], 1.0)
    probs = torch.where(torch.isfinite(scaled).any(), scaled.softmax(dim=-1), certain)
    return torch.multinomial(probs, 1, generator=generator)[0]


class RowSampler(LogitsProcessor):
    """The last logits processor of the batch: EOS masking for ``min_tokens``, then per-row sampling."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        prompt_width: int,
        eos_ids: Sequence[int],
        device,
        row_done: Callable[[int], bool] = lambda row: False,
    ):
        self.params = list(params)
        self.row_done = row_done  # finished rows get pad tokens anyway: no need to draw for them
        self.prompt_width = prompt_width
        self.eos_ids = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        self.generators = []
        for p in self.params:
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            self.generators.append(torch.Generator(device=device).manual_seed(seed % 2**63))
        self.sampled_rows = [row for row, p in enumerate(self.params) if p.temperature > 0]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        generated = input_ids.shape[1] - self.prompt_width
        masked_rows = [row for row, p in enumerate(self.params) if generated < p.min_tokens]
        if not masked_rows and not self.sampled_rows:
            return scores
        scores = scores.clone()
        if masked_rows and len(self.eos_ids):
            rows = torch.tensor(masked_rows, device=scores.device)
            scores[rows.unsqueeze(1), self.eos_ids.unsqueeze(0)] = float("-inf")
        for row in self.sampled_rows:
            if self.row_done(row):
                continue
            p = self.params[row]
            token = sample_token(scores[row], p.temperature, p.top_p, self.generators[row])
            scores[row] = float("-inf")
            scores[row].index_fill_(0, token[None], 0.0)
        return scores
