"""Logits only where they are read: :func:`logits_at` runs a causal LM's head at the given sequence positions.

The LM head and the log-softmax over the vocabulary are a large share of a small model's forward (SmolLM2-135M:
~20 %) and the largest activation of any model's (``[batch, length, vocab]``); scores and losses read them only
at response tokens. transformers' CausalLM heads take ``logits_to_keep`` (an index tensor selects positions);
a model without it gets full logits, then the same positions.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM under any wrapper (PEFT) takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def logits_at(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Logits ``[batch, len(positions), vocab]`` at sequence ``positions`` (a 1-D index tensor, ascending)."""
    if accepts_logits_to_keep(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, positions]


def predicting_positions(targets_mask: torch.Tensor) -> torch.Tensor:
    """The positions ``t`` whose logits predict a scored token ``t + 1`` in some row, from ``targets_mask``
    ``[batch, length - 1]`` (True where token ``t + 1`` is scored)."""
    return targets_mask.any(0).nonzero().squeeze(-1)
