"""Prefill vs decode without trusting argument names, and the upstream internals the hooks rely on."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import transformers
from torch import nn

from persona.hooks import block_hooks, locate_blocks
from persona.hooks.phase import PhaseError, cached_tokens, decide_prefill, find_cache
from persona.steering import SteeringSpec, steer


def record_phases(store: list):
    def fn(hidden, state):
        store.append((state.prefill, hidden.shape[1], state.attention_mask is not None))

    return fn


def test_cache_renamed_upstream_is_still_found_regression_transformers_5_24():
    """Regression: transformers 5.24 passes the KV cache as ``cache=`` instead of ``past_key_values=``; a
    tracker that read one keyword took every cached decode step for a prefill pass (steering the wrong tokens)."""
    from transformers.cache_utils import DynamicCache

    class Block(nn.Module):
        def forward(self, hidden, **kwargs):
            return (hidden + 1,)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, hidden, attention_mask=None, some_future_name=None):
            for block in self.layers:
                hidden = block(hidden)[0]
            return hidden

    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), layer_idx=0)
    seen = []
    stack = Stack()
    with block_hooks(stack, [(1, record_phases(seen))]):
        stack(torch.zeros(1, 1, 8), attention_mask=torch.ones(1, 5), some_future_name=cache)
        stack(torch.zeros(1, 4, 8), attention_mask=torch.ones(1, 4))
    assert [prefill for prefill, _, _ in seen] == [False, True]


@pytest.mark.parametrize(
    ("cache_tokens", "mask_columns", "seq_len", "expected"),
    [
        (None, None, 5, True),  # plain forward
        (0, 5, 5, True),  # generate's prompt pass with an empty cache
        (5, 6, 1, False),  # decode step
        (5, None, 1, False),  # decode without a padding mask: the cache alone decides
        (0, None, 5, True),
        (None, 5, 5, True),  # no cache, mask covers the input: prefill
    ],
)
def test_signals_that_agree_decide_the_phase(cache_tokens, mask_columns, seq_len, expected):
    mask = None if mask_columns is None else torch.ones(2, mask_columns)
    assert decide_prefill(cache_tokens=cache_tokens, mask=mask, seq_len=seq_len, model_name="M") is expected


@pytest.mark.parametrize(("cache_tokens", "mask_columns"), [(0, 6), (5, 1), (None, 6)])
def test_signals_that_disagree_name_the_model_and_the_transformers_version(cache_tokens, mask_columns):
    import transformers

    message = decide_prefill(
        cache_tokens=cache_tokens,
        mask=torch.ones(1, mask_columns),
        seq_len=1,
        model_name="MysteryForCausalLM",
    )
    assert isinstance(message, str)
    assert "MysteryForCausalLM" in message and transformers.__version__ in message and "Fix:" in message


def test_unknown_phase_refuses_positional_steering_but_not_all_positions(tiny_llama, tokenizer, monkeypatch):
    """A decode step whose cache the tracker cannot recognise (a future cache type) is ambiguous: refuse."""
    from persona.hooks import registry

    enc = tokenizer(["hello there"], return_tensors="pt")
    length = enc["input_ids"].shape[1]
    step = {
        "input_ids": enc["input_ids"][:, -1:],
        "attention_mask": torch.ones(1, length + 1, dtype=torch.long),
    }
    monkeypatch.setattr(registry, "find_cache", lambda args, kwargs: None)
    spec = SteeringSpec(1, torch.ones(32), 1.0, positions="response")
    with pytest.raises(PhaseError, match=r"LlamaForCausalLM.*transformers"), steer(tiny_llama, [spec]):
        tiny_llama(**step, past_key_values=tiny_llama(**enc, use_cache=True).past_key_values)
    with steer(tiny_llama, [SteeringSpec(1, torch.ones(32), 1.0, positions="all")]):
        tiny_llama(**step, past_key_values=tiny_llama(**enc, use_cache=True).past_key_values)


def test_legacy_tuple_caches_are_found_and_measured():
    legacy = tuple((torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4)) for _ in range(3))
    assert find_cache((), {"whatever": legacy}) is legacy
    assert cached_tokens(legacy) == 7
    assert find_cache((torch.zeros(2, 3),), {"x": None, "y": 3}) is None


def test_generate_passes_a_findable_cache_and_a_2d_mask_on_every_architecture(tiny_model, tokenizer):
    """Pins two transformers behaviours the phase relies on: the stack receives the KV cache as an argument
    (under any name) and the 2D padding mask as ``attention_mask``, on the prompt pass and every decode step."""
    from persona.hooks import registry

    seen_caches = []
    real = registry.find_cache

    def spy(args, kwargs):
        cache = real(args, kwargs)
        seen_caches.append(cache is not None)
        return cache

    batch = tokenizer(["Hello there, friend.", "Hi"], padding=True, padding_side="left", return_tensors="pt")
    steps = []
    registry.find_cache = spy
    try:
        with block_hooks(tiny_model, [(1, record_phases(steps))]):
            tiny_model.generate(
                **batch,
                max_new_tokens=3,
                min_new_tokens=3,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        registry.find_cache = real
    assert [prefill for prefill, _, _ in steps] == [True, False, False]
    assert all(has_mask for _, _, has_mask in steps), "the stack no longer receives a 2D attention_mask"
    assert all(seen_caches), "the KV cache is no longer passed to the decoder stack as an argument"


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x records hidden states inside a patched block forward, before any hook can edit them",
)
def test_hf_hidden_states_show_our_edits_even_when_its_recorders_came_first(tiny_model, tokenizer):
    """transformers 5 installs its output_hidden_states recorders on the blocks once, at first use; our hooks
    must still run before them. Pins torch's ordered ``_forward_hooks`` dict, which the reordering uses."""
    enc = tokenizer(["hello there friend"], return_tensors="pt")
    with torch.no_grad():
        plain = tiny_model(**enc, output_hidden_states=True).hidden_states  # recorders now installed
        vector = torch.randn(32)
        with steer(tiny_model, [SteeringSpec(2, vector, 1.0, positions="all")]):
            steered = tiny_model(**enc, output_hidden_states=True).hidden_states
    torch.testing.assert_close(steered[2], plain[2] + vector)
    block = locate_blocks(tiny_model).blocks[1]
    assert isinstance(block._forward_hooks, OrderedDict)


@pytest.mark.skipif(
    __import__("persona.steering.fast", fromlist=["x"]).fast_path_supported() is not None,
    reason="the compiled static-cache path needs transformers >= 5 and torch >= 2.6",
)
def test_static_cache_phase_reads_nothing_off_the_device_under_compile_regression_item_graph_break():
    """Regression: ``int(cache.get_seq_length())`` read a static cache's device counter inside transformers'
    compiled decode step: a ``Tensor.item()`` graph break there (a host sync per step with ``fullgraph``)."""
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig
    from transformers.cache_utils import StaticCache

    from persona.hooks.phase import cached_tokens

    config = LlamaConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    cache = StaticCache(config=config, max_cache_len=8)
    assert cached_tokens(cache) == 0  # nothing written yet: known without a read
    for layer in range(2):
        cache.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), layer_idx=layer)
    assert cached_tokens(cache) == 3  # eager: read

    counters.clear()
    compiled = torch.compile(lambda c, x: x + 1 if cached_tokens(c) else x - 1, backend="eager")
    assert torch.equal(compiled(cache, torch.zeros(2)), torch.ones(2))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert cached_tokens(None) is None
