"""Read per-example residual-stream means from a batch: the shared step of extraction, projection and metrics.

:func:`example_projections` is the one "score examples along directions" step: ``persona project``,
layer metrics, screening, finetuning shift and the training monitor all call it.

For each requested layer and each example: the mean over prompt tokens (``prompt_avg``), the mean
over response tokens (``response_avg``) and the last prompt token (``prompt_last``). Only the blocks
up to the deepest requested layer run; the LM head never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from persona.core.constants import VECTOR_KINDS
from persona.core.hardware import input_device
from persona.hooks import block_hooks, forward_until
from persona.hooks.operators import gather_positions, masked_mean, project


def read_example_means(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    layers: Sequence[int],
    kinds: Sequence[str] = VECTOR_KINDS,
    *,
    norm_sums: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example means at ``layers``: ``{kind: [batch, len(layers), hidden]}`` in float32.

    ``batch`` comes from :func:`persona.data.batches.collate` (any padding side works: positions are
    taken from its masks). ``norm_sums`` (float64 ``[len(layers)]``): the same forward adds each layer's sum of
    residual norms over the batch's real tokens but each row's first (an attention sink, see
    :func:`persona.vectors.norms.mean_residual_norm`) to it; :func:`norm_token_mask` counts those tokens.
    """
    unknown = set(kinds) - set(VECTOR_KINDS)
    if unknown:
        raise ValueError(f"Unknown kinds {sorted(unknown)}; choose from {VECTOR_KINDS}.")
    out: dict[str, list[torch.Tensor | None]] = {kind: [None] * len(layers) for kind in kinds}
    device = batch[
        "input_ids"
    ].device  # a model split across devices (device_map) reads each layer where it runs

    typical = None if norm_sums is None else norm_token_mask(batch).double()

    def reader(slot: int):
        def hook(hidden: torch.Tensor, _state) -> None:
            hidden = hidden.float()
            if typical is not None:
                norms = hidden.double().norm(dim=-1) * typical.to(hidden.device)
                norm_sums[slot] += norms.sum().to(norm_sums.device)
            if "prompt_avg" in out:
                mean = masked_mean(hidden, batch["prompt_mask"].to(hidden.device))
                out["prompt_avg"][slot] = mean.to(device)
            if "response_avg" in out:
                mean = masked_mean(hidden, batch["response_mask"].to(hidden.device))
                out["response_avg"][slot] = mean.to(device)
            if "prompt_last" in out:
                last = gather_positions(hidden, batch["last_prompt_index"].to(hidden.device))
                out["prompt_last"][slot] = last.to(device)

        return hook

    with block_hooks(
        model, [(layer, reader(slot)) for slot, layer in enumerate(layers)], stop_after_layer=max(layers)
    ):
        forward_until(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {kind: torch.stack(values, dim=1) for kind, values in out.items()}


def norm_token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """bool [batch, seq]: every real token but each row's first (either padding side)."""
    real = batch["attention_mask"].bool()
    first = real & (real.long().cumsum(dim=1) == 1)
    return real & ~first


def kind_row_mask(batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Which rows have tokens for ``kind`` (an example with an empty response adds nothing to response_avg)."""
    if kind == "response_avg":
        return batch["response_mask"].any(dim=1)
    return batch["prompt_mask"].any(dim=1)


def example_projections(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    layers: Sequence[int],
    directions: torch.Tensor,
    kinds: Sequence[str] = ("response_avg",),
    *,
    cosine: bool = False,
) -> dict[str, torch.Tensor]:
    """``{kind: [batch, n_targets]}``: each example's ``kind`` mean at ``layers[i]`` on ``directions[i]``.

    ``directions``: ``[n_targets, hidden]``. Projection on the unit direction, or cosine similarity.
    Rows without tokens of a kind (an empty response) score NaN, as the seed's mean over no tokens
    does. One forward for every kind and target, blocks up to ``max(layers)``; a layer shared by
    several targets is read once.
    """
    distinct = sorted(set(layers))
    means = read_example_means(model, batch, distinct, kinds=kinds)
    slots = [distinct.index(layer) for layer in layers]
    return {
        kind: project(values[:, slots], directions, cosine=cosine).masked_fill(
            ~kind_row_mask(batch, kind)[:, None], float("nan")
        )
        for kind, values in means.items()
    }


@torch.no_grad()
def text_means(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    kinds: Sequence[str] = VECTOR_KINDS,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Per-text activations of plain ``texts`` (no chat template): ``{kind: [len(texts), len(layers), hidden]}``.

    A text is read as a whole: ``prompt_avg`` and ``response_avg`` are the mean over its tokens but the first (an
    attention sink, as for the residual norms), ``prompt_last`` its last token. Right-padded batches through
    :func:`read_example_means`, so it is the same reading extraction does.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token. Fix: set tokenizer.pad_token = tokenizer.eos_token."
        )
    device, parts = input_device(model), []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]), padding=True, padding_side="right", return_tensors="pt"
        )
        mask = encoded["attention_mask"].to(device)
        batch = {"input_ids": encoded["input_ids"].to(device), "attention_mask": mask}
        tokens = norm_token_mask(batch)
        batch.update(prompt_mask=tokens, response_mask=tokens, last_prompt_index=mask.sum(dim=1) - 1)
        parts.append(read_example_means(model, batch, layers, kinds))
    return {kind: torch.cat([part[kind] for part in parts]) for kind in kinds}
