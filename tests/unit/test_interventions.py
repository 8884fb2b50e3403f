"""Capping, gates and orthogonalisation (issue 25): the pure operators against float64 arithmetic, and the specs in
steer(), per-row batches and the fast path against independent computations on every tiny architecture."""

from __future__ import annotations

import pytest
import torch

from persona.data.batches import left_pad
from persona.data.chat import encode_chat
from persona.hooks import block_hooks
from persona.hooks.operators import cap, gate_fires, orthogonalise
from persona.steering import AblationSpec, CapSpec, Gate, SteeringSpec, orthogonalise_specs, steer
from persona.steering.rows import RowInterventions, steer_rows
from persona.vectors.norms import mean_residual_norm
from serve_support import CHATS

HIDDEN = 32
TEXTS = ["Hello there, my good friend.", "Hurt", "Why did the chicken cross the road?"]


def direction(seed: int, norm: float = 1.0) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def reference_cap(hidden: torch.Tensor, vector: torch.Tensor, lo, hi) -> torch.Tensor:
    """Independent float64 clamp: decompose into parallel + orthogonal parts, clamp the parallel coefficient."""
    h, u = hidden.double(), vector.double() / vector.double().norm()
    coefficient = h @ u
    clamped = coefficient.clamp(min=lo, max=hi)
    return h - coefficient[..., None] * u + clamped[..., None] * u


# --- pure operators -------------------------------------------------------------------------------------------


def test_cap_clamps_the_projection_and_keeps_the_orthogonal_part():
    hidden = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(0)) * 2
    vector = direction(1, norm=3.0)  # not unit: the operator uses the unit direction
    lo, hi = -1.0, 1.5
    out = cap(hidden, vector, lo, hi)
    torch.testing.assert_close(out.double(), reference_cap(hidden, vector, lo, hi), atol=1e-5, rtol=1e-5)
    unit = vector / vector.norm()
    projection = hidden @ unit
    inside = (projection >= lo) & (projection <= hi)
    assert inside.any() and (~inside).any()
    assert torch.equal(out[inside], hidden[inside])  # selected, not recomputed
    one_sided = cap(hidden, vector, None, hi)
    torch.testing.assert_close(
        one_sided.double(), reference_cap(hidden, vector, None, hi), atol=1e-5, rtol=1e-5
    )


def test_cap_with_a_range_holding_everything_is_bit_identical_and_positions_limit_it():
    hidden = torch.randn(2, 4, HIDDEN, generator=torch.Generator().manual_seed(1))
    vector = direction(2)
    projection = hidden @ vector
    assert torch.equal(cap(hidden, vector, float(projection.min()), float(projection.max())), hidden)
    positions = torch.zeros(2, 4, dtype=torch.bool)
    positions[:, -1] = True
    out = cap(hidden, vector, 0.0, 0.0, positions)
    assert torch.equal(out[:, :-1], hidden[:, :-1])
    torch.testing.assert_close(out[:, -1] @ vector, torch.zeros(2), atol=1e-5, rtol=0)


def test_cap_per_row_equals_each_row_capped_alone_bit_for_bit():
    hidden = torch.randn(3, 4, HIDDEN, generator=torch.Generator().manual_seed(2))
    vectors = torch.stack([direction(3), direction(4), torch.zeros(HIDDEN)])
    lo = torch.tensor([-0.2, -float("inf"), -float("inf")])
    hi = torch.tensor([0.1, 0.3, float("inf")])
    out = cap(hidden, vectors, lo, hi)
    for row in range(2):
        alone = cap(hidden[row : row + 1], vectors[row], lo[row], hi[row])
        assert torch.equal(out[row : row + 1], alone)
    assert torch.equal(out[2], hidden[2])  # no cap for this row: untouched


def test_gate_fires_strictly_past_the_threshold():
    reading = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(3))
    vector = direction(5, norm=4.0)
    projection = reading.double() @ (vector.double() / 4.0)
    ordered = projection.sort().values
    threshold = float(ordered[2:4].mean())  # between two rows: no float32-vs-float64 tie at the threshold
    assert torch.equal(gate_fires(reading, vector, above=threshold), projection > threshold)
    assert torch.equal(gate_fires(reading, vector, below=threshold), projection < threshold)
    per_row = gate_fires(reading, vector, above=torch.full((6,), float("inf")))
    assert not per_row.any()


def test_orthogonalise_in_a_stated_order_against_projection_on_earlier_spans():
    vectors = torch.stack([direction(6), direction(7) + 0.8 * direction(6), direction(8)]).double()
    order = [2, 0, 1]
    orthogonal, overlap = orthogonalise(vectors, order)
    assert torch.equal(orthogonal[2], vectors[2])  # first in the order: unchanged
    for position, index in enumerate(order[1:], start=1):
        earlier = vectors[order[:position]]
        q, _ = torch.linalg.qr(earlier.T)  # independent: the projector on the earlier vectors' span
        expected = vectors[index] - q @ (q.T @ vectors[index])
        torch.testing.assert_close(orthogonal[index], expected)
    assert (orthogonal @ orthogonal.T - torch.diag(orthogonal.norm(dim=-1) ** 2)).abs().max() < 1e-12
    expected_overlap = torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None], dim=-1)
    torch.testing.assert_close(overlap, expected_overlap)
    assert not torch.allclose(orthogonalise(vectors, [0, 1, 2])[0], orthogonal)  # the order matters
    with pytest.raises(ValueError, match="lies in the span"):
        orthogonalise(torch.stack([vectors[0], 2 * vectors[0]]))
    with pytest.raises(ValueError, match="not a permutation"):
        orthogonalise(vectors, [0, 0, 1])


# --- on models: capping -------------------------------------------------------------------------------------


def capture(store: list):
    def fn(hidden, state):
        store.append(hidden.detach().clone())

    return fn


def around(model, layer, specs, run):
    """(hidden before the specs, after them) at ``layer`` for every forward of ``run()``."""
    before, after = [], []
    with (
        block_hooks(model, [(layer, capture(before))]),
        steer(model, specs),
        block_hooks(model, [(layer, capture(after))]),
        torch.no_grad(),
    ):
        run()
    return before, after


@pytest.mark.parametrize("side", ["left", "right"])
def test_cap_in_steer_matches_manual_math_on_output_hidden_states(tiny_model, tokenizer, side):
    from conftest import hidden_states_without_final_norm

    batch = tokenizer(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    layer, vector = 2, direction(9)
    arch = tiny_model.config.model_type
    states = hidden_states_without_final_norm(tiny_model, arch, **batch)
    projection = states[layer] @ vector
    real = batch["attention_mask"].bool()
    lo, hi = float(projection[real].quantile(0.3)), float(projection[real].quantile(0.7))
    spec = CapSpec(layer, vector, lo, hi, positions="prompt")
    _, [after] = around(tiny_model, layer, [spec], lambda: tiny_model(**batch))
    expected = reference_cap(states[layer], vector, lo, hi)
    expected[~real] = states[layer][~real].double()  # positions="prompt": padding keeps its values
    torch.testing.assert_close(after.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_cap_holding_every_activation_is_bit_identical_to_no_cap(tiny_model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        plain = tiny_model(**batch).logits
        caps = [CapSpec(layer, direction(layer), -1e6, 1e6) for layer in range(4)]
        with steer(tiny_model, caps):
            capped = tiny_model(**batch).logits
    assert torch.equal(capped, plain)


# --- on models: gates ---------------------------------------------------------------------------------------


def greedy(model, batch, new_tokens=6):
    return model.generate(
        **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )


def prefill_projections(model, batch, layer, vector):
    """Independent: each row's last real prompt token at ``layer`` (HF hidden_states), on the unit vector."""
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states[layer]
    last = batch["attention_mask"].shape[1] - 1 - batch["attention_mask"].flip(-1).argmax(-1)
    return states[torch.arange(len(states)), last] @ (vector / vector.norm())


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_gate_decides_per_row_at_prefill_and_holds_for_every_decode_step(tiny_model, tokenizer, side):
    batch = tokenizer(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    gate_layer, layer, vector = 1, 2, direction(10)
    projections = prefill_projections(tiny_model, batch, gate_layer, vector)
    threshold = float(projections.sort().values[:2].mean())  # the lowest row stays below, the others fire
    expected = projections > threshold
    assert expected.any() and not expected.all()
    push = direction(11, norm=3.0)
    spec = SteeringSpec(layer, push, 1.0, positions="all", when=Gate(gate_layer, vector, above=threshold))

    def runs():
        if side == "right":  # one forward: right padding cannot generate
            tiny_model(**batch)
        else:
            greedy(tiny_model, batch)

    before, after = around(tiny_model, layer, [spec], runs)
    assert len(before) == (1 if side == "right" else 6)
    for step_before, step_after in zip(before, after, strict=True):  # prefill and every decode step alike
        delta = step_after - step_before
        torch.testing.assert_close(delta[expected], push.expand_as(delta[expected]), atol=1e-5, rtol=0)
        assert torch.equal(delta[~expected], torch.zeros_like(delta[~expected]))


def test_a_gate_that_never_fires_is_bit_identical_to_unsteered(tiny_model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    never = Gate(1, direction(12), above=1e6)
    specs = [
        SteeringSpec(2, direction(13, 5.0), 1.0, when=never),
        AblationSpec(3, direction(14), when=never),
        CapSpec(2, direction(15), 0.0, 0.0, when=never),
    ]
    with torch.no_grad():
        plain_logits, plain_tokens = tiny_model(**batch).logits, greedy(tiny_model, batch)
        with steer(tiny_model, specs):
            assert torch.equal(tiny_model(**batch).logits, plain_logits)
            assert torch.equal(greedy(tiny_model, batch), plain_tokens)
        always = [SteeringSpec(2, direction(13, 5.0), 1.0, when=Gate(1, direction(12), below=1e6))]
        with steer(tiny_model, always):
            gated = greedy(tiny_model, batch)
        with steer(tiny_model, [SteeringSpec(2, direction(13, 5.0), 1.0)]):
            assert torch.equal(gated, greedy(tiny_model, batch))  # a gate firing for all = ungated


def test_bad_gates_and_caps_are_refused_with_the_field_and_the_fix(tmp_path):
    from persona.vectors import save_vector

    with pytest.raises(ValueError, match=r"when.layer=3 comes after the entry's layer 2.*Fix"):
        SteeringSpec(2, direction(1), 1.0, when=Gate(3, direction(2), above=0.0))
    with pytest.raises(ValueError, match="give exactly one threshold"):
        Gate(1, direction(2), above=0.0, below=1.0)
    with pytest.raises(ValueError, match=r"CapSpec: lo=1.0 is above hi=0.0"):
        CapSpec(1, direction(1), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"CapSpec.hi='p99' is a percentile.*CapSpec.from_file"):
        CapSpec(1, direction(1), None, "p99")
    path = save_vector(torch.randn(4, HIDDEN), tmp_path / "old_response_avg_diff.pt", {"trait": "old"})
    with pytest.raises(ValueError, match=r"old_response_avg_diff.json records no .*re-run `persona extract`"):
        CapSpec.from_file(path, 2, hi="p99")


def test_bounds_resolve_against_the_sidecar_percentiles(tmp_path):
    from persona.vectors import save_vector
    from persona.vectors.ranges import PROJECTION_PERCENTILES, percentile_record

    table = [[layer * 10 + i for i in range(len(PROJECTION_PERCENTILES))] for layer in range(4)]
    meta = {"negative_projection_percentiles": percentile_record(table)}
    path = save_vector(torch.randn(4, HIDDEN), tmp_path / "t_response_avg_diff.pt", meta)
    spec = CapSpec.from_file(path, 2, lo="p5", hi=30.5)
    assert (spec.lo, spec.hi) == (21.0, 30.5)
    assert Gate.from_file(path, 3, above="p99").above == 36.0
    with pytest.raises(ValueError, match=r"records p1, p5, p25, p50, p75, p95, p99. Fix"):
        CapSpec.from_file(path, 2, hi="p90")


# --- orthogonalised steering --------------------------------------------------------------------------------


def test_orthogonalised_steering_pushes_each_entry_minus_its_part_along_earlier_ones(tiny_llama, tokenizer):
    batch = tokenizer(TEXTS[:2], padding=True, padding_side="left", return_tensors="pt")
    v1, v2, v3 = direction(20, 2.0), direction(21, 1.0) + direction(20, 1.0), direction(22, 1.5)
    specs = [
        SteeringSpec(2, v1, 1.5, "all"),
        SteeringSpec(2, v2, -2.0, "all"),
        SteeringSpec(1, v3, 1.0, "all", relative=True, reference_norm=3.0),
    ]
    new, overlaps = orthogonalise_specs(specs)
    unit1 = v1.double() / v1.double().norm()
    v2_rest = v2.double() - (v2.double() @ unit1) * unit1
    assert list(overlaps) == [2]
    torch.testing.assert_close(overlaps[2][0, 1], torch.cosine_similarity(v1, v2, dim=0))
    before, after = [], []
    with (
        block_hooks(tiny_llama, [(2, capture(before))]),
        steer(tiny_llama, specs, orthogonalise=True),
        block_hooks(tiny_llama, [(2, capture(after))]),
        torch.no_grad(),
    ):
        tiny_llama(**batch)
    plain = []
    with steer(tiny_llama, [new[2]]), block_hooks(tiny_llama, [(2, capture(plain))]), torch.no_grad():
        tiny_llama(**batch)  # layer 1's push (relative scale kept) reaches layer 2 the same way
    delta = after[0] - plain[0]
    expected = (1.5 * v1.double() - 2.0 * v2_rest).float()
    torch.testing.assert_close(delta, expected.expand_as(delta), atol=1e-5, rtol=0)
    assert new[2] is specs[2]  # alone at its layer: untouched
    assert (new[1].coef, new[1].relative) == (specs[1].scale(), False)


# --- per-row batches and the fast path ------------------------------------------------------------------------


def mixed_rows(norm: float, up: float, down: float) -> list[RowInterventions]:
    """Caps, gated steering and ablation (firing or not), orthogonalised entries, and a plain row."""
    gate_up, gate_down = Gate(1, direction(30), above=up), Gate(2, direction(30), below=down)
    return [
        RowInterventions([CapSpec(2, direction(31), -0.05 * norm, 0.05 * norm)]),
        RowInterventions([SteeringSpec(2, direction(32, norm), 0.8, when=gate_up)]),
        RowInterventions(),
        RowInterventions(
            [SteeringSpec(2, direction(33, norm), 0.6, when=gate_down), AblationSpec(3, direction(34))]
        ),
        RowInterventions(
            [
                SteeringSpec(2, direction(35, norm), 0.7, "all"),
                SteeringSpec(2, direction(35, norm) + direction(36, norm), -0.5),
                CapSpec(1, direction(37), None, 0.0, when=gate_up),
            ],
            orthogonalise=True,
        ),
    ]


def generate_alone(model, ids, row, pad_id, new_tokens=8):
    input_ids, attention_mask = left_pad([ids], pad_id)
    with steer(model, row.specs, orthogonalise=row.orthogonalise), torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False
        )
    return out[0, input_ids.shape[1] :].tolist()


def test_mixed_batch_with_caps_gates_and_orthogonalised_rows_equals_each_row_alone(tiny_model, tokenizer):
    pad_id = tokenizer.pad_token_id
    tiny_model.generation_config.pad_token_id = pad_id
    norm = 3 * mean_residual_norm(tiny_model, tokenizer, TEXTS, 2)
    prompts = [encode_chat(tokenizer, chat) for chat in CHATS[:5]]
    input_ids, attention_mask = left_pad(prompts, pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    # Thresholds just past rows 1 and 3 (gated up at layer 1, down at layer 2): they fire, rows beyond them don't.
    at_1 = prefill_projections(tiny_model, batch, 1, direction(30))
    at_3 = prefill_projections(tiny_model, batch, 2, direction(30))
    lower = at_1[at_1 < at_1[1]]
    up = float((at_1[1] + (lower.max() if len(lower) else at_1[1] - 1)) / 2)
    higher = at_3[at_3 > at_3[3]]
    down = float((at_3[3] + (higher.min() if len(higher) else at_3[3] + 1)) / 2)
    rows = mixed_rows(norm, up, down)
    with steer_rows(tiny_model, rows), torch.no_grad():
        batched = tiny_model.generate(**batch, max_new_tokens=8, do_sample=False)[:, input_ids.shape[1] :]
    alone = [generate_alone(tiny_model, ids, row, pad_id) for ids, row in zip(prompts, rows, strict=True)]
    assert batched.tolist() == alone
    plain = [generate_alone(tiny_model, ids, RowInterventions(), pad_id) for ids in prompts]
    assert sum(a != p for a, p in zip(alone, plain, strict=True)) >= 2  # the interventions change text


@pytest.mark.parametrize("mode", ["static", "compile"])
def test_fast_path_gives_the_plain_paths_tokens_with_caps_and_gates(tiny_llama, tokenizer, mode):
    from transformers import CompileConfig

    from persona.steering.fast import FastGenerator, fast_path_supported

    if fast_path_supported() is not None:
        pytest.skip(fast_path_supported())
    texts = ["Hello there, my good friend.", "Hi", "Why did the chicken"]
    input_ids, attention_mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    ordered = prefill_projections(tiny_llama, batch, 1, direction(40)).sort().values
    threshold = float(ordered[1:3].mean())
    specs = [
        SteeringSpec(2, direction(41, 3.0), 1.0, when=Gate(1, direction(40), above=threshold)),
        CapSpec(3, direction(42), -0.1, 0.1, positions="response"),
        AblationSpec(2, direction(43), when=Gate(2, direction(40), below=threshold)),
    ]
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with steer(tiny_llama, specs), torch.no_grad():
        plain = tiny_llama.generate(**batch, **kwargs)
    fast_mode = "static" if mode == "static" else CompileConfig(backend="eager", mode=None)
    with FastGenerator(tiny_llama, fast_mode) as generator, torch.no_grad():
        fast = generator.generate(input_ids, attention_mask, specs, **kwargs)
        again = generator.generate(
            input_ids[:2], attention_mask[:2], specs, **kwargs
        )  # a new prefill decides anew
    assert generator.fallback is None  # the compiled decode step traced the gates and caps (no fallback)
    assert torch.equal(fast, plain)
    with steer(tiny_llama, specs), torch.no_grad():
        assert torch.equal(
            again, tiny_llama.generate(input_ids=input_ids[:2], attention_mask=attention_mask[:2], **kwargs)
        )
