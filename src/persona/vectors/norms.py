"""Residual-stream norms: the typical size of a layer's activations, the yardstick for steering strengths."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from persona.core.hardware import input_device
from persona.hooks import block_hooks, forward_until
from persona.hooks.registry import ForwardState


@torch.no_grad()
def mean_residual_norm(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layer: int,
    batch_size: int = 8,
    *,
    skip_first_token: bool = True,
) -> float:
    """Mean L2 norm of the residual stream at ``layer`` over the real tokens of ``texts``.

    ``skip_first_token`` leaves out each text's first token: it is an attention sink whose norm dwarfs
    the rest (SmolLM2-135M, layer 15: ~25,000 vs ~160), so including it makes the "typical" norm ~20x
    too large. The forward stops right after ``layer``; texts are right-padded so tokens keep their positions.
    """
    return mean_residual_norms(
        model, tokenizer, texts, [layer], batch_size, skip_first_token=skip_first_token
    )[0]


@torch.no_grad()
def mean_residual_norms(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 8,
    *,
    skip_first_token: bool = True,
) -> list[float]:
    """:func:`mean_residual_norm` at every one of ``layers`` from one forward per batch (up to the deepest)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("mean_residual_norm needs a non-empty list of texts. Fix: pass e.g. [text1, text2].")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token. Fix: set tokenizer.pad_token = tokenizer.eos_token."
        )
    device = input_device(model)
    totals = torch.zeros(len(layers), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)

    def capture(slot: int):
        def hook(hidden: Tensor, state: ForwardState) -> None:
            mask = state.attention_mask[:, -hidden.shape[1] :].to(hidden.device, torch.float64)
            if skip_first_token:
                mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1)  # right padding
            totals[slot] += (hidden.double().norm(dim=-1) * mask).sum().to(device)
            if slot == 0:
                count.add_(mask.sum().to(device))

        return hook

    hooks = [(layer, capture(slot)) for slot, layer in enumerate(layers)]
    with block_hooks(model, hooks, stop_after_layer=max(layers)):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                padding_side="right",
                return_tensors="pt",
            )
            forward_until(
                model,
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            )
    if float(count) == 0:
        raise ValueError(
            "mean_residual_norm: no tokens to average (texts are empty, or one token each with "
            "skip_first_token=True). Fix: pass longer texts."
        )
    return (totals / count).tolist()
