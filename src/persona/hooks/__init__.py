"""The one hook mechanism: locate decoder blocks, apply pure operators at chosen layers, always clean up.

Layer convention (shared with vector files): layer 0 is the embedding output (the input of block 0);
layer L >= 1 is the raw output of decoder block L-1, i.e. HF ``hidden_states[L]`` for L < num_layers.
Layer ``num_layers`` is the last block's raw output, *before* the final norm (HF's last
``hidden_states`` entry is taken after the norm).

May import: ``core``, ``models`` (a model's width from its config). Extraction, steering, the training callbacks
and the server's monitoring all hook layers through here; nothing else registers a forward hook.
"""

from persona.hooks.layers import DecoderLayout, locate_blocks, unwrap_model
from persona.hooks.registry import StopForward, block_hooks, forward_until

__all__ = ["DecoderLayout", "StopForward", "block_hooks", "forward_until", "locate_blocks", "unwrap_model"]
