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

from persona.generation.sampling import sample_token  # the engine's draw: one for both


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0  # end-of-sequence tokens are masked until this many tokens were generated


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
