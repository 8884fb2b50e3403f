"""The hook mechanism: block location, cleanup, truncated forwards and the pure operators."""

import pytest
import torch
from torch import nn

from persona.hooks import StopForward, block_hooks, forward_until, locate_blocks
from persona.hooks.operators import ablate_directions, add_direction, masked_mean, orthonormalize, project


def test_locates_blocks_of_every_architecture(tiny_model):
    layout = locate_blocks(tiny_model)
    assert layout.num_layers == tiny_model.config.num_hidden_layers


def test_locates_blocks_through_peft(tiny_llama):
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert locate_blocks(wrapped).blocks is locate_blocks(tiny_llama).blocks


def test_unknown_architecture_error_names_the_class():
    class Mystery(nn.Module):
        pass

    with pytest.raises(TypeError, match="Mystery"):
        locate_blocks(Mystery())


def test_hooks_are_removed_even_on_exceptions(tiny_llama, tokenizer):
    blocks = locate_blocks(tiny_llama).blocks
    with pytest.raises(RuntimeError, match="boom"), block_hooks(tiny_llama, [(1, lambda h, s: h)]):
        raise RuntimeError("boom")
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in blocks)


def test_layer_out_of_range_is_a_clear_error(tiny_llama):
    with (
        pytest.raises(ValueError, match=r"layer=4 is out of range .* 3 blocks"),
        block_hooks(tiny_llama, [(4, print)]),
    ):
        pass


def test_truncated_forward_skips_later_blocks_and_the_head(tiny_llama, tokenizer):
    calls = []
    blocks = locate_blocks(tiny_llama).blocks
    handle = blocks[2].register_forward_hook(lambda *a: calls.append("block2"))
    head = tiny_llama.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    try:
        enc = tokenizer(["hello there"], return_tensors="pt")
        with block_hooks(tiny_llama, [(2, lambda h, s: None)], stop_after_layer=2):
            forward_until(tiny_llama, **enc)
    finally:
        handle.remove()
        head.remove()
    assert calls == []


def test_stop_forward_is_an_exception_not_a_silent_return():
    assert issubclass(StopForward, Exception)


def test_hooks_work_with_gradients(tiny_llama, tokenizer):
    vector = torch.randn(32)
    enc = tokenizer(["hello there"], return_tensors="pt")
    with block_hooks(tiny_llama, [(1, lambda h, s: add_direction(h, vector, 2.0))]):
        loss = tiny_llama(**enc).logits.sum()
    loss.backward()
    assert tiny_llama.model.embed_tokens.weight.grad is not None


def test_add_direction_only_at_positions():
    hidden = torch.zeros(2, 3, 4)
    vector = torch.tensor([1.0, 0.0, 0.0, 0.0])
    positions = torch.tensor([[True, False, False], [False, False, True]])
    out = add_direction(hidden, vector, 2.0, positions)
    assert out[0, 0, 0] == 2.0 and out[1, 2, 0] == 2.0 and out.sum() == 4.0
    assert torch.equal(add_direction(hidden, vector, 0.0), hidden)


def test_ablation_leaves_no_component_along_the_directions():
    torch.manual_seed(0)
    directions = torch.randn(3, 16)
    basis = orthonormalize(directions)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    hidden = torch.randn(2, 5, 16)
    ablated = ablate_directions(hidden, basis)
    assert (ablated @ directions.T).abs().max() < 1e-4
    # the orthogonal complement is untouched
    other = torch.randn(16)
    other = other - (other @ basis.T) @ basis
    torch.testing.assert_close(ablated @ other, hidden @ other, atol=1e-4, rtol=1e-4)


def test_orthonormalize_drops_dependent_directions():
    v = torch.randn(8)
    assert orthonormalize(torch.stack([v, 2 * v])).shape == (1, 8)
    with pytest.raises(ValueError, match="zero"):
        orthonormalize(torch.zeros(2, 8))


def test_masked_mean_and_projection():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(masked_mean(hidden, mask), torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(project(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])), torch.tensor(4.0))


def test_ablation_hook_zeroes_the_component_inside_a_model(tiny_model, tokenizer):
    hidden_size = tiny_model.get_input_embeddings().weight.shape[-1]
    basis = orthonormalize(torch.randn(2, hidden_size))
    seen = {}
    enc = tokenizer(["hello there friend"], return_tensors="pt")
    with block_hooks(
        tiny_model, [(2, lambda h, s: ablate_directions(h, basis)), (2, lambda h, s: seen.setdefault("h", h))]
    ):
        tiny_model(**enc)
    assert (seen["h"] @ basis.T).abs().max() < 1e-4


def test_block_walk_finds_the_same_blocks_as_the_known_paths(tiny_model):
    """If an architecture's attribute path moves upstream, walking the modules still finds its blocks."""
    from persona.hooks.layers import _walk_for_blocks, unwrap_model

    path, blocks = _walk_for_blocks(unwrap_model(tiny_model))
    assert blocks is locate_blocks(tiny_model).blocks
    assert path == locate_blocks(tiny_model).path


def test_an_unlisted_block_path_is_found_by_walking():
    class Block(nn.Module):
        def forward(self, hidden):
            return hidden

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2)])  # a list of another length is not the block list
            self.stages = nn.ModuleList([Block(), Block(), Block()])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 3})()
            self.backbone = Decoder()

    model = Model()
    layout = locate_blocks(model)
    assert layout.path == "backbone.stages" and layout.stack is model.backbone

    model.config = type("Config", (), {})()  # no depth to check a list against: refuse rather than guess
    with pytest.raises(TypeError, match="Cannot find the decoder blocks of Model"):
        locate_blocks(model)
