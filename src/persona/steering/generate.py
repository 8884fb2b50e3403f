"""Steered generation of whole replies: prompts or chats in, answers out, batched by length, on the plain or the
fast path (:mod:`persona.steering.fast`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

from torch import nn

from persona.core.errors import PersonaError
from persona.core.hardware import input_device
from persona.data.batches import bounded_batches, left_pad
from persona.data.chat import Messages, answer_text, encode_chat
from persona.models import context_length
from persona.steering.fast import FastGenerator, fast_mode
from persona.steering.spec import Spec, steer


def check_room(encoded: Sequence[list[int]], max_new_tokens: int, context: int | None) -> None:
    """Every prompt leaves ``max_new_tokens`` within the model's context (past it, positions run out or repeat)."""
    over = [i for i, ids in enumerate(encoded) if context is not None and len(ids) + max_new_tokens > context]
    if over:
        raise PersonaError(
            f"{len(over)} of {len(encoded)} prompts (the first: #{over[0]}, {len(encoded[over[0]])} tokens) plus "
            f"{max_new_tokens} new tokens pass the model's context of {context} tokens. Fix: shorten those prompts "
            "or ask for fewer new tokens."
        )


def generate_steered(
    model: nn.Module,
    tokenizer,
    prompts_or_messages: Sequence[str | Messages],
    specs: Sequence[Spec] = (),
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    batch_size: int = 16,
    fast=False,
    orthogonalise: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Generate a completion per prompt under steering; returns the new text only, in input order.

    A ``str`` is used as-is (the tokenizer's special tokens added); a message list ``[{"role", "content"}]``
    goes through the chat template with the generation prompt. Batches are left-padded, similar lengths
    grouped together (longest first, no prompt padded past twice its length), and decoded with HF ``generate`` and its KV cache. ``temperature=0``
    means greedy; the default 1.0 samples as the paper's evaluations do. ``generate_kwargs`` go to
    ``model.generate``.

    ``fast``: ``False`` (default) is the plain dynamic-cache path. For the fast path pass an open
    :class:`persona.steering.fast.FastGenerator`, which compiles once for all the calls it serves (``persona
    generate`` holds one per run); a mode here (``"auto"``: compile on CUDA, plain elsewhere; ``True``/
    ``"compile"``; ``"static"``; a transformers ``CompileConfig``) opens a session for this call alone, so a
    compiling mode compiles again on every call. Every mode gives the plain path's tokens (see
    :mod:`persona.steering.fast`).

    ``specs``: steering, cap and ablation specs, gated or not; ``orthogonalise``: see
    :func:`persona.steering.orthogonalise_specs`. A gate decides per prompt at prefill, so batching never changes
    which prompts it fires for.
    """
    if isinstance(prompts_or_messages, str):
        raise TypeError("prompts_or_messages is a single string. Fix: pass a list of prompts, e.g. [prompt].")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token. Fix: set tokenizer.pad_token.")
    if isinstance(fast, FastGenerator) and fast.model is not model:
        raise ValueError(
            "fast= is a session opened on another model. Fix: open FastGenerator(model) on this one."
        )
    device = input_device(model)
    mode = fast_mode(fast, device)
    encoded = [encode_chat(tokenizer, item) for item in prompts_or_messages]
    check_room(encoded, max_new_tokens, context_length(tokenizer, getattr(model, "config", None)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "pad_token_id": pad_id}
    if temperature > 0:
        kwargs["temperature"] = temperature
    kwargs.update(generate_kwargs)
    outputs: list[str] = [""] * len(encoded)
    with ExitStack() as stack:
        if mode == "off":
            stack.enter_context(steer(model, specs, orthogonalise=orthogonalise))
            generator = None
        elif isinstance(fast, FastGenerator):
            generator = fast
        else:
            generator = stack.enter_context(FastGenerator(model, fast))
        lengths = [len(encoded[i]) for i in order]
        for rows in bounded_batches(range(len(order)), lengths, max_rows=batch_size):
            chunk = [order[row] for row in rows]
            input_ids, attention_mask = left_pad([encoded[i] for i in chunk], pad_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            if generator is None:
                generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            else:
                generated = generator.generate(
                    input_ids, attention_mask, specs, orthogonalise=orthogonalise, **kwargs
                )
            for i, new_ids in zip(chunk, generated[:, input_ids.shape[1] :].tolist(), strict=True):
                outputs[i] = answer_text(tokenizer, new_ids)
    return outputs
