"""Per-row steering: the pure operators, and a mixed batch equal to each row steered on its own (every architecture)."""

from __future__ import annotations

import pytest
import torch

from persona.data.batches import left_pad
from persona.hooks import block_hooks
from persona.hooks.operators import (
    ablate_directions,
    ablate_row_directions,
    add_direction,
    add_row_directions,
    orthonormalize,
    project,
)
from persona.steering import SteeringSpec, steer
from persona.steering.rows import RowInterventions, steer_rows
from persona.vectors.norms import mean_residual_norm
from serve_support import CHATS as SERVED_CHATS

HIDDEN = 32


def direction(seed: int, norm: float = 1.0) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def test_add_row_directions_equals_add_direction_row_by_row_bit_for_bit():
    hidden = torch.randn(3, 5, HIDDEN)
    vectors = [direction(1), direction(2), torch.zeros(HIDDEN)]
    coefs = [0.7, -1.3, 0.0]
    positions = torch.rand(3, 5) > 0.5
    deltas = torch.stack([c * v for c, v in zip(coefs, vectors, strict=True)])
    for where in (positions, None):
        out = add_row_directions(hidden, deltas, where)
        for row in range(3):
            alone = add_direction(
                hidden[row : row + 1],
                vectors[row],
                coefs[row],
                None if where is None else where[row : row + 1],
            )
            assert torch.equal(out[row : row + 1], alone)
    assert torch.equal(add_row_directions(hidden, deltas, positions)[2], hidden[2])  # zero delta: untouched


def test_ablate_row_directions_removes_each_rows_own_span_only():
    hidden = torch.randn(3, 4, HIDDEN, dtype=torch.float64)
    basis_a = orthonormalize(torch.stack([direction(3), direction(4)]).double())
    basis_b = orthonormalize(direction(5)[None].double())
    bases = torch.zeros(3, 2, HIDDEN, dtype=torch.float64)
    bases[0] = basis_a
    bases[1, :1] = basis_b  # padded with a zero row
    out = ablate_row_directions(hidden, bases)
    torch.testing.assert_close(out[0], ablate_directions(hidden[0], basis_a))
    torch.testing.assert_close(out[1], ablate_directions(hidden[1], basis_b))
    assert torch.equal(out[2], hidden[2])  # no directions: exactly unchanged
    assert (out[0] @ basis_a.T).abs().max() < 1e-12
    assert (out[1] @ basis_b.T).abs().max() < 1e-12


def test_project_on_every_direction_matches_project_per_direction():
    hidden = torch.randn(2, 3, HIDDEN)
    directions = torch.stack([direction(6, 3.0), direction(7, 0.5)])
    out = project(hidden.unsqueeze(-2), directions)
    assert out.shape == (2, 3, 2)
    for index in range(2):
        torch.testing.assert_close(out[..., index], project(hidden, directions[index]))


CHATS = SERVED_CHATS[:5]


def mixed_rows(norm: float) -> list[RowInterventions]:
    """Every position mode, two specs at one layer, specs at several layers, an ablation, and a plain row."""

    def spec(layer, seed, coef, positions="response"):
        return SteeringSpec(layer, direction(seed), coef * norm, positions=positions)

    ablation = orthonormalize(torch.stack([direction(20), direction(21)]))
    return [
        RowInterventions([spec(1, 10, 0.6), spec(1, 11, -0.4, "all")]),
        RowInterventions(),
        RowInterventions([spec(2, 12, -0.8, "prompt"), spec(3, 13, 0.5, "generated")]),
        RowInterventions([spec(2, 14, 0.7)], ablations={2: ablation}),
        RowInterventions([spec(0, 15, 0.3, "all")], ablations={3: ablation[:1]}),
    ]


def generate_alone(model, ids: list[int], row: RowInterventions, pad_id: int, new_tokens: int) -> list[int]:
    """The reference: steer() with the row's specs, ablations through block_hooks ahead of it."""
    ablations = [
        (layer, lambda h, _s, b=basis: ablate_directions(h, b)) for layer, basis in row.ablations.items()
    ]
    input_ids, attention_mask = left_pad([ids], pad_id)
    with block_hooks(model, ablations), steer(model, row.specs), torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False
        )
    return out[0, input_ids.shape[1] :].tolist()


def test_mixed_batch_rows_equal_each_row_steered_alone(tiny_model, tokenizer):
    from persona.data.chat import encode_chat

    pad_id = tokenizer.pad_token_id
    tiny_model.generation_config.pad_token_id = pad_id
    norm = mean_residual_norm(
        tiny_model, tokenizer, ["Hello there, my good friend.", "Why did the chicken"], 2
    )
    rows = mixed_rows(3 * norm)
    prompts = [encode_chat(tokenizer, chat) for chat in CHATS]
    input_ids, attention_mask = left_pad(prompts, pad_id)
    with steer_rows(tiny_model, rows), torch.no_grad():
        batched = tiny_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False
        )
    batched = batched[:, input_ids.shape[1] :].tolist()
    alone = [generate_alone(tiny_model, ids, row, pad_id, 8) for ids, row in zip(prompts, rows, strict=True)]
    assert batched == alone
    plain = [generate_alone(tiny_model, ids, RowInterventions(), pad_id, 8) for ids in prompts]
    assert sum(a != p for a, p in zip(alone, plain, strict=True)) >= 2  # strong enough to change the text


def capture(store: list):
    def fn(hidden, state):
        store.append(hidden.detach().clone())

    return fn


@pytest.mark.parametrize("side", ["left", "right"])
def test_prefill_edits_per_row_match_steer_on_that_row(tiny_llama, tokenizer, side):
    rows = mixed_rows(2.0)[:3]
    batch = tokenizer(
        ["A raw prompt string that is long", "Hi", "Tell me a joke"],
        padding=True,
        padding_side=side,
        return_tensors="pt",
    )
    layer = 1

    def edits(row_interventions, run):
        before, after = [], []
        with (
            block_hooks(tiny_llama, [(layer, capture(before))]),
            row_interventions,
            block_hooks(tiny_llama, [(layer, capture(after))]),
            torch.no_grad(),
        ):
            run()
        return after[0] - before[0]

    batched = edits(steer_rows(tiny_llama, rows), lambda: tiny_llama(**batch))
    for index, row in enumerate(rows):
        one_row = {
            key: value[index : index + 1] for key, value in batch.items()
        }  # same padding, same columns
        alone = edits(steer(tiny_llama, row.specs), lambda one_row=one_row: tiny_llama(**one_row))[0]
        assert torch.equal(batched[index] != 0, alone != 0)  # the same positions, nothing elsewhere
        torch.testing.assert_close(batched[index], alone, atol=1e-5, rtol=1e-5)


def test_bad_rows_are_refused_before_any_hook(tiny_llama):
    hooks = sum(len(m._forward_hooks) for m in tiny_llama.modules())
    with (
        pytest.raises(ValueError, match="out of range"),
        steer_rows(tiny_llama, [RowInterventions([SteeringSpec(9, direction(1), 1.0)])]),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"needs \[k, 32\]"),
        steer_rows(tiny_llama, [RowInterventions(ablations={1: torch.zeros(2, 8)})]),
    ):
        pass
    assert sum(len(m._forward_hooks) for m in tiny_llama.modules()) == hooks
