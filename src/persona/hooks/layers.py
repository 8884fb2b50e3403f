"""Find the list of decoder blocks of any decoder-only HF model, PEFT-wrapped or not."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from persona.models import text_config_value

# Attribute paths from the causal-LM wrapper to its block list, most common first.
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3 text, Phi3, OLMo, Granite
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom, CodeGen
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers whose text stack sits one level deeper
    "transformer.layers",
    "layers",  # a bare decoder stack
)


@dataclass(frozen=True)
class DecoderLayout:
    """Where the residual stream of a model can be read: ``stack`` owns ``blocks``."""

    model: nn.Module
    stack: nn.Module
    blocks: nn.ModuleList
    path: str

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_device(self, layer: int):
        """The device of the residual stream at ``layer`` (models split across GPUs have several).

        A block that accelerate offloads (``device_map`` with ``cpu``/``disk`` entries) keeps its weights on the
        meta device between calls and runs on its hook's ``execution_device``: that is where the stream is.
        """
        module = self.blocks[max(layer - 1, 0)]
        if layer == 0 and hasattr(self.model, "get_input_embeddings"):
            # Layer 0 is read by a pre-hook on block 0, before accelerate moves the block's input: it is still
            # where the embeddings put it.
            module = self.model.get_input_embeddings() or module
        execution = _execution_device(module)
        if execution is not None:
            return torch.device(execution)
        return next(module.parameters()).device


def _execution_device(block: nn.Module):
    """Where accelerate runs ``block`` (its hooks sit on the block or on its submodules), or None."""
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook
            device = getattr(part, "execution_device", None)
            if device is not None:
                return device
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip PEFT and DDP wrappers so attribute paths are the architecture's own."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            inner = model.get_base_model()
            if inner is model:
                return model
            model = inner
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DistributedDataParallel
            model = model.module
        else:
            return model


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    node = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _configured_depth(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            depth = getattr(cfg, name, None)
            if isinstance(depth, int) and depth > 0:
                return depth
    return None


def _walk_for_blocks(base: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The outermost list of same-class modules whose length is the configured depth (any attribute path)."""
    depth = _configured_depth(base)
    if depth is None:  # without it, the first list of identical modules could be vision blocks or experts
        return None
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != depth:
            continue
        if len({type(child) for child in module}) == 1:
            return name, module
    return None


def locate_blocks(model: nn.Module) -> DecoderLayout:
    """Return the decoder block list of ``model``; a clear error naming the class when there is none.

    Known attribute paths are tried first; a model whose path moved upstream (or that nobody listed)
    is found by walking its modules for a list of identical blocks as long as ``config.num_hidden_layers``.
    """
    base = unwrap_model(model)
    found = None
    for path in BLOCK_PATHS:
        blocks = _resolve(base, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            found = path, blocks
            break
    found = found or _walk_for_blocks(base)
    if found is not None:
        path, blocks = found
        stack_path = path.rpartition(".")[0]
        stack = base.get_submodule(stack_path) if stack_path else base
        return DecoderLayout(model=base, stack=stack, blocks=blocks, path=path)
    raise TypeError(
        f"Cannot find the decoder blocks of {type(base).__name__}: none of the attribute paths "
        f"{', '.join(BLOCK_PATHS)} is a non-empty nn.ModuleList, and no list of identical modules as long "
        "as config.num_hidden_layers was found. Fix: add this architecture's block path to "
        "persona.hooks.layers.BLOCK_PATHS."
    )


def check_layer(layout: DecoderLayout, layer: int, *, what: str = "layer") -> int:
    """Validate a layer index in the vector-file convention (0 = embeddings, N = last block)."""
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= layout.num_layers:
        raise ValueError(
            f"{what}={layer!r} is out of range for {type(layout.model).__name__} with {layout.num_layers} "
            f"blocks. Fix: choose 0..{layout.num_layers} (0 = embedding output, L = output of block L-1)."
        )
    return layer


def hidden_size(layout: DecoderLayout) -> int:
    """Width of the residual stream of the model behind ``layout``."""
    size = text_config_value(getattr(layout.model, "config", None), ("hidden_size",))
    return size if size is not None else layout.model.get_input_embeddings().embedding_dim
