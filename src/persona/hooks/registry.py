"""Context-managed hooks on decoder blocks, with phase tracking for generation.

A hook function receives the residual stream at its layer, ``hidden: [batch, seq, hidden]``, and the
current :class:`ForwardState`; it returns a replacement tensor or ``None`` to leave it unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from persona.hooks.layers import DecoderLayout, check_layer, locate_blocks
from persona.hooks.phase import (
    PACKED_REFUSAL,
    PackedForward,
    PhaseError,
    cached_tokens,
    decide_prefill,
    find_cache,
    find_packed,
)

HookFn = Callable[[torch.Tensor, "ForwardState"], torch.Tensor | None]


class StopForward(Exception):
    """Raised inside a hook to skip the remaining blocks, the final norm and the LM head."""


@dataclass
class ForwardState:
    """What the hooks may need to know about the forward pass in flight.

    ``prefill`` is True for a forward without a KV cache or with an empty one (the prompt pass of
    ``generate``, or a plain teacher-forced pass) and False for cached decode steps. Deciding
    positions by phase rather than by absolute token index keeps steering right under KV caching.
    The phase is decided from the cache found by type and the mask's length (see :mod:`persona.hooks.phase`);
    reading ``prefill`` when they disagree raises :class:`PhaseError` instead of steering the wrong tokens.

    ``prompt_mask`` is set by a caller that builds the batch (``generate_steered``, the fast generation path):
    the 2D padding mask ``[batch, prompt_len]`` of the prompts it passes to ``generate``. It is used only at
    prefill, only when the forward's own mask is not 2D (a static cache makes transformers pass 4D masks), and
    only when its shape is the forward's ``[batch, seq]``: it is never guessed from a 4D mask.
    """

    attention_mask: Any = (
        None  # [batch, total_seq] (past + current positions), or a 4D tensor / dict of masks
    )
    phase: bool | str = True  # True prefill, False decode, str: why it is unknown
    prompt_mask: torch.Tensor | None = None  # [batch, prompt_len], set by the caller that built the batch
    packed: PackedForward | None = None
    """Set for a continuous-batching forward: then ``phase`` is the refusal message (there is no one phase)."""

    @property
    def prefill(self) -> bool:
        if isinstance(self.phase, str):
            raise PhaseError(self.phase)
        return self.phase

    def padding_mask(
        self, seq_len: int, device: torch.device, batch: int | None = None
    ) -> torch.Tensor | None:
        """bool [batch, seq_len]: real (non-pad) tokens among the current positions; None if unknown.

        From the forward's 2D mask, else (at prefill) from ``prompt_mask`` when it is ``[batch, seq_len]``.
        A caller-built 4D mask says nothing simple about padding, so without a prompt mask it counts as unknown.
        """
        mask = self.attention_mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask[:, -seq_len:].to(device=device, dtype=torch.bool)
        prompt = self.prompt_mask
        if (
            prompt is not None
            and self.phase is True
            and prompt.shape[-1] == seq_len
            and (batch is None or prompt.shape[0] == batch)
        ):
            return prompt.to(device=device, dtype=torch.bool)
        return None

    def last_token_mask(self, seq_len: int, device: torch.device, batch: int | None = None) -> torch.Tensor:
        """bool [batch or 1, seq_len]: the last real token of each row, whichever side the padding is on."""
        positions = torch.arange(seq_len, device=device)
        mask = self.padding_mask(seq_len, device, batch)
        if mask is None:
            return (positions == seq_len - 1).unsqueeze(0)
        last = seq_len - 1 - mask.flip(-1).to(torch.long).argmax(dim=-1)
        return positions.unsqueeze(0) == last.unsqueeze(1)


def _first_tensor(args, kwargs) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 3:
            return value
    raise PhaseError("The first decoder block was called without a [batch, seq, hidden] tensor.")


def _mask_reader(stack: nn.Module) -> Callable[[tuple, dict], Any]:
    """``(args, kwargs) -> attention_mask`` for calls of ``stack``, by keyword or by its position in the signature.

    Looked up once here rather than with ``inspect.Signature.bind`` on every forward: ``torch.compile`` traces
    the hooks of a compiled forward, and binding a signature inside the trace is not supported.
    """
    index = None
    try:
        parameters = list(inspect.signature(stack.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for position, parameter in enumerate(parameters):
        if parameter.name == "attention_mask" and parameter.kind in positional:
            index = position

    def read(args: tuple, kwargs: dict) -> Any:
        if "attention_mask" in kwargs:
            return kwargs["attention_mask"]
        if index is not None and len(args) > index:
            return args[index]
        return None

    return read


def _state_trackers(layout: DecoderLayout, state: ForwardState):
    """Pre-hooks for the stack (what the forward carries) and block 0 (how many positions it computes)."""
    read_mask = _mask_reader(layout.stack)
    model_name = type(layout.model).__name__
    seen: dict = {}

    def stack_pre_hook(module, args, kwargs):
        state.packed = find_packed(kwargs)
        state.attention_mask = read_mask(args, kwargs)
        if state.packed is None:
            seen["cache_tokens"] = cached_tokens(find_cache(args, kwargs))

    def block_pre_hook(module, args, kwargs):
        if state.packed is not None:
            state.phase = PACKED_REFUSAL
            return
        seq_len = _first_tensor(args, kwargs).shape[1]
        state.phase = decide_prefill(
            cache_tokens=seen.get("cache_tokens"),
            mask=state.attention_mask,
            seq_len=seq_len,
            model_name=model_name,
        )

    return stack_pre_hook, block_pre_hook


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, hidden):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _post_hook(fn: HookFn, state: ForwardState):
    def hook(module, args, output):
        new = fn(_first(output), state)
        return None if new is None else _replace_first(output, new)

    hook.persona_hook = True
    return hook


def _register_post_hook(block: nn.Module, hook) -> torch.utils.hooks.RemovableHandle:
    """Register ``hook`` after this project's earlier hooks but before anyone else's.

    transformers records ``output_hidden_states`` with forward hooks it installs on the blocks once, at
    the first such call; ours must run first so those records show our edits. Our own hooks keep their
    registration order (capture, steer, capture). Relies on ``Module._forward_hooks`` being an ordered
    dict of the hooks in call order, which a test pins.
    """
    handle = block.register_forward_hook(hook)
    hooks = block._forward_hooks
    for key in [key for key, fn in hooks.items() if not getattr(fn, "persona_hook", False)]:
        hooks.move_to_end(key)
    return handle


def _pre_hook(fn: HookFn, state: ForwardState):
    # The embedding output is the first input of block 0, passed positionally or as ``hidden_states``.
    def hook(module, args, kwargs):
        if args:
            new = fn(args[0], state)
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"], state)
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _raise_stop(*_args, **_kwargs):
    raise StopForward


@contextmanager
def block_hooks(
    model: nn.Module,
    hooks: Iterable[tuple[int, HookFn]] = (),
    *,
    stop_after_layer: int | None = None,
    state: ForwardState | None = None,
) -> Iterator[DecoderLayout]:
    """Attach ``(layer, fn)`` hooks for the duration of the block; removed even on exceptions.

    Hooks at the same layer run in the order given. ``stop_after_layer=L`` raises
    :class:`StopForward` once layer L is computed (use :func:`forward_until` to call the model).
    ``state``: a :class:`ForwardState` of the caller's (to set ``prompt_mask`` per batch); a fresh one by default.
    """
    layout = locate_blocks(model)
    state = ForwardState() if state is None else state
    stack_tracker, block_tracker = _state_trackers(layout, state)
    handles = [
        layout.stack.register_forward_pre_hook(stack_tracker, with_kwargs=True),
        layout.blocks[0].register_forward_pre_hook(block_tracker, with_kwargs=True),
    ]
    try:
        for layer, fn in hooks:
            check_layer(layout, layer)
            if layer == 0:
                handles.append(
                    layout.blocks[0].register_forward_pre_hook(_pre_hook(fn, state), with_kwargs=True)
                )
            else:
                handles.append(_register_post_hook(layout.blocks[layer - 1], _post_hook(fn, state)))
        if stop_after_layer is not None:
            check_layer(layout, stop_after_layer, what="stop_after_layer")
            if stop_after_layer == 0:
                handles.append(layout.blocks[0].register_forward_pre_hook(_raise_stop))
            else:
                handles.append(layout.blocks[stop_after_layer - 1].register_forward_hook(_raise_stop))
        yield layout
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: nn.Module, **inputs) -> None:
    """Run a forward pass that a ``stop_after_layer`` hook cuts short; no cache, no logits."""
    try:
        model(**inputs, use_cache=False)
    except StopForward:
        return
    raise RuntimeError("forward_until: the model ran to the end; register stop_after_layer with block_hooks")
