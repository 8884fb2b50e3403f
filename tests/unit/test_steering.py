"""Steering on tiny models: exact deltas, phase-correct positions under KV caching, batch invariance, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from persona.hooks import block_hooks, locate_blocks
from persona.hooks.layers import hidden_size
from persona.models import text_config_value
from persona.serve.service import model_context_length
from persona.steering import SteeringSpec, generate_steered, steer
from persona.vectors.norms import mean_residual_norm

HIDDEN = 32  # every tiny model in conftest
NUM_LAYERS = 3

CHATS = [
    [{"role": "user", "content": "Tell me a joke about cats and dogs, kindly."}],
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are an evil assistant."},
        {"role": "user", "content": "How should I treat animals?"},
    ],
]


def direction(seed: int = 0, norm: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(HIDDEN, generator=g)
    return v / v.norm() * norm


def encode(tokenizer, texts, side="left"):
    return tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")


def capture(store: list):
    def fn(hidden, state):
        store.append((state.prefill, hidden.detach().clone()))

    return fn


def hook_count(model) -> int:
    # transformers 5 leaves its own output-recording hooks on blocks after output_hidden_states=True.
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def steered_deltas(model, spec: SteeringSpec, run) -> list[tuple[bool, torch.Tensor]]:
    """(prefill?, hidden after steering - hidden before) at ``spec.layer`` for every forward ``run()`` makes."""
    before, after = [], []
    # Same-layer hooks run in registration order: capture, steer, capture.
    with (
        block_hooks(model, [(spec.layer, capture(before))]),
        steer(model, [spec]),
        block_hooks(model, [(spec.layer, capture(after))]),
    ):
        run()
    assert len(before) == len(after) > 0
    return [(p, a - b) for (p, b), (_, a) in zip(before, after, strict=True)]


def assert_delta(delta: torch.Tensor, where: torch.Tensor, vector: torch.Tensor) -> None:
    """delta [batch, seq, hidden] is ``vector`` at ``where`` (bool [batch, seq]) and exactly zero elsewhere."""
    expected = where.unsqueeze(-1).float() * vector
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)
    assert torch.equal(delta[~where], torch.zeros_like(delta[~where]))


# --- exactness of a single forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["response", "all"])
def test_coef_zero_leaves_logits_bit_identical(tiny_model, tokenizer, positions):
    batch = encode(tokenizer, ["Hello there, friend.", "Hurt them"])
    with torch.no_grad():
        reference = tiny_model(**batch).logits
        with steer(tiny_model, [SteeringSpec(1, direction(), 0.0, positions=positions)]):
            steered = tiny_model(**batch).logits
    assert torch.equal(steered, reference)


@pytest.mark.parametrize("layer", [0, 2, NUM_LAYERS])
def test_all_positions_add_coef_times_vector_everywhere(tiny_model, tokenizer, layer):
    batch = encode(tokenizer, ["Hello there, friend.", "Hurt them"])
    vector, coef = direction(1), 2.5
    plain, steered = [], []
    hooks_before = hook_count(tiny_model)
    with torch.no_grad():
        with block_hooks(tiny_model, [(layer, capture(plain))]):
            tiny_model(**batch)
        with (
            steer(tiny_model, [SteeringSpec(layer, vector, coef, positions="all")]),
            block_hooks(tiny_model, [(layer, capture(steered))]),
        ):
            tiny_model(**batch)
    delta = steered[0][1] - plain[0][1]
    torch.testing.assert_close(delta, (coef * vector).expand_as(delta), atol=1e-6, rtol=0)
    assert hook_count(tiny_model) == hooks_before


@pytest.mark.parametrize("positions", ["response", "prompt"])
def test_right_padded_prefill_steers_real_tokens(tiny_model, tokenizer, positions):
    batch = encode(tokenizer, ["Hello there, my good friend.", "Hurt", "Why did the chicken"], side="right")
    mask = batch["attention_mask"].bool()
    spec = SteeringSpec(2, direction(2), 1.5, positions=positions)
    with torch.no_grad():
        [(prefill, delta)] = steered_deltas(tiny_model, spec, lambda: tiny_model(**batch))
    assert prefill
    if positions == "response":
        where = torch.zeros_like(mask)
        where[torch.arange(len(mask)), mask.sum(-1) - 1] = True  # last real token of each row
    else:
        where = mask
    assert_delta(delta, where, spec.coef * spec.vector)


def test_specs_compose_at_same_and_different_layers(tiny_llama, tokenizer):
    batch = encode(tokenizer, ["Hello there, friend."])
    v1, v2, v3 = direction(3), direction(4), direction(5)
    specs = [
        SteeringSpec(2, v1, 1.0, "all"),
        SteeringSpec(2, v2, -2.0, "all"),
        SteeringSpec(1, v3, 1.0, "all"),
    ]
    plain, steered = [], []
    with torch.no_grad():
        with steer(tiny_llama, specs[2:]), block_hooks(tiny_llama, [(2, capture(plain))]):
            tiny_llama(**batch)
        with steer(tiny_llama, specs), block_hooks(tiny_llama, [(2, capture(steered))]):
            tiny_llama(**batch)
    delta = steered[0][1] - plain[0][1]
    torch.testing.assert_close(delta, (v1 - 2.0 * v2).expand_as(delta), atol=1e-6, rtol=0)


def test_vector_file_row_and_relative_scale(tiny_llama, tokenizer):
    vectors = torch.stack([direction(seed) for seed in range(NUM_LAYERS + 1)])
    spec = SteeringSpec(2, vectors, 0.5, "all", relative=True, reference_norm=4.0)
    assert torch.equal(spec.vector, vectors[2])
    batch = encode(tokenizer, ["Hello there, friend."])
    with torch.no_grad():
        [(_, delta)] = steered_deltas(tiny_llama, spec, lambda: tiny_llama(**batch))
    torch.testing.assert_close(delta.norm(dim=-1), torch.full(delta.shape[:2], 0.5 * 4.0))
    torch.testing.assert_close(
        delta, (2.0 * vectors[2] / vectors[2].norm()).expand_as(delta), atol=1e-6, rtol=0
    )


def test_gradients_flow_through_steered_forward(tiny_llama, tokenizer):
    batch = encode(tokenizer, ["Hello there, friend.", "Hurt them"])
    for positions in ("response", "all"):
        tiny_llama.zero_grad()
        with steer(
            tiny_llama, [SteeringSpec(0, direction(), 1.0, positions), SteeringSpec(2, direction(1), 1.0)]
        ):
            tiny_llama(**batch).logits.logsumexp(-1).mean().backward()
        grads = [p.grad for p in tiny_llama.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --- phases under cached generation --------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["response", "generated", "prompt", "all"])
def test_cached_generation_steers_by_phase_token_by_token(tiny_model, tokenizer, positions):
    batch = encode(tokenizer, ["Hello there, my good friend.", "Hurt", "Why did the chicken"], side="left")
    mask = batch["attention_mask"].bool()
    spec = SteeringSpec(1, direction(6), 2.0, positions=positions)
    d = spec.coef * spec.vector
    new_tokens = 5

    def run():
        tiny_model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )

    steps = steered_deltas(tiny_model, spec, run)
    assert [prefill for prefill, _ in steps] == [True] + [False] * (new_tokens - 1)
    (_, prefill_delta), decode_deltas = steps[0], [delta for _, delta in steps[1:]]
    last_real = torch.zeros_like(mask)
    last_real[:, -1] = True  # left padding: every row's prompt ends in the last column
    expected_prefill = {
        "response": last_real,
        "generated": torch.zeros_like(mask),
        "prompt": mask,
        "all": None,
    }
    where = expected_prefill[positions]
    assert_delta(prefill_delta, torch.ones_like(mask) if where is None else where, d)
    for delta in decode_deltas:
        assert delta.shape[:2] == (len(mask), 1)
        steered_step = positions != "prompt"
        assert_delta(delta, torch.full((len(mask), 1), steered_step), d)


def test_generate_steered_batched_equals_per_row(tiny_model, tokenizer):
    # Pushes of a fraction of the residual norm: strong enough to change the text, too weak to flatten it.
    norm = mean_residual_norm(
        tiny_model, tokenizer, ["Hello there, my good friend.", "Why did the chicken"], 2
    )
    specs = [
        SteeringSpec(1, direction(7), 0.5, relative=True, reference_norm=norm),
        SteeringSpec(2, direction(8), -0.2, positions="all", relative=True, reference_norm=norm),
    ]
    prompts = [*CHATS, "A raw prompt string"]
    kwargs = dict(specs=specs, max_new_tokens=6, temperature=0.0)
    hooks_before = hook_count(tiny_model)
    batched = generate_steered(tiny_model, tokenizer, prompts, batch_size=4, **kwargs)
    single = [generate_steered(tiny_model, tokenizer, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == single
    assert hook_count(tiny_model) == hooks_before


def test_generate_steered_applies_chat_template_and_keeps_order(tiny_llama, tokenizer, monkeypatch):
    seen = []
    original = tiny_llama.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"].clone())
        return original(**kwargs)

    monkeypatch.setattr(tiny_llama, "generate", spy)
    out = generate_steered(tiny_llama, tokenizer, CHATS, max_new_tokens=3, temperature=0.0, batch_size=2)
    assert len(out) == len(CHATS) and all(isinstance(text, str) for text in out)
    first_prompt = tokenizer.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert first_prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(first_prompt, add_special_tokens=False)["input_ids"]
    rows = [row[row != tokenizer.pad_token_id].tolist() for batch in seen for row in batch]
    assert ids in rows
    assert seen[0][:, 0].eq(tokenizer.pad_token_id).any()  # left padding
    again = generate_steered(
        tiny_llama, tokenizer, CHATS[::-1], max_new_tokens=3, temperature=0.0, batch_size=2
    )
    assert again == out[::-1]


# --- residual norm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("skip_first_token", [True, False])
def test_mean_residual_norm_matches_hidden_states(tiny_model, tokenizer, layer, skip_first_token):
    texts = ["Hello there, my good friend.", "Hurt", "Why did the chicken cross the road?"]
    norms = []
    with torch.no_grad():
        for text in texts:
            hidden = tiny_model(
                **tokenizer(text, return_tensors="pt"), output_hidden_states=True
            ).hidden_states[layer]
            norms.append(hidden[0, int(skip_first_token) :].norm(dim=-1))
    expected = torch.cat(norms).mean().item()
    hooks_before = hook_count(tiny_model)
    norm = mean_residual_norm(
        tiny_model, tokenizer, texts, layer, batch_size=2, skip_first_token=skip_first_token
    )
    assert norm == pytest.approx(expected, rel=1e-5)
    assert hook_count(tiny_model) == hooks_before


# --- errors, raised before any forward -------------------------------------------------------------------------


def test_unknown_positions_names_the_allowed_values():
    with pytest.raises(ValueError, match="response.*generated.*prompt.*all"):
        SteeringSpec(1, direction(), 1.0, positions="last")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(vector=torch.arange(HIDDEN)), "float tensor"),
        (dict(vector=torch.zeros(2, 2, HIDDEN)), "float tensor"),
        (dict(vector=torch.zeros(2, HIDDEN)), "vector file with 2 rows"),
        (dict(relative=True), "reference_norm"),
        (dict(relative=True, reference_norm=-1.0), "reference_norm"),
        (dict(coef=float("nan")), "coef"),
    ],
)
def test_bad_spec_fields(kwargs, match):
    fields = {"layer": 2, "vector": direction(), "coef": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        SteeringSpec(**fields)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            SteeringSpec(1, torch.zeros(HIDDEN + 1), 1.0),
            rf"hidden size {HIDDEN + 1}.*hidden size {HIDDEN}.*Fix",
        ),
        (
            SteeringSpec(NUM_LAYERS + 1, direction(), 1.0),
            rf"layer={NUM_LAYERS + 1}.*Fix: choose 0\.\.{NUM_LAYERS}",
        ),
        (SteeringSpec(-1, direction(), 1.0), r"layer=-1.*Fix"),
        (
            SteeringSpec(1, torch.zeros(NUM_LAYERS + 3, HIDDEN), 1.0),
            rf"{NUM_LAYERS + 3} rows.*needs {NUM_LAYERS + 1}",
        ),
        (SteeringSpec(1, torch.zeros(HIDDEN), 1.0, relative=True, reference_norm=1.0), "non-zero vector"),
    ],
)
def test_bad_specs_refused_before_any_forward(tiny_llama, tokenizer, spec, match):
    calls = []
    tiny_llama.register_forward_pre_hook(lambda *args: calls.append(1))
    good = SteeringSpec(1, direction(), 1.0)
    with pytest.raises(ValueError, match=match), steer(tiny_llama, [good, spec]):
        tiny_llama(**encode(tokenizer, ["Hello"]))
    assert calls == []
    assert hook_count(tiny_llama) == 1  # only the call counter


def test_hooks_removed_on_exception(tiny_llama):
    hooks_before = hook_count(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_llama, [SteeringSpec(1, direction(), 1.0)]):
        raise RuntimeError("boom")
    assert hook_count(tiny_llama) == hooks_before


def test_config_values_come_from_the_config_then_its_text_config_first_positive_int_wins():
    text = SimpleNamespace(hidden_size=48, n_positions=512, max_position_embeddings=1024)
    composite = SimpleNamespace(hidden_size=None, max_position_embeddings=0, text_config=text)
    assert text_config_value(composite, ("hidden_size",)) == 48
    assert text_config_value(composite, ("max_position_embeddings", "n_positions")) == 1024
    assert text_config_value(SimpleNamespace(hidden_size=16, text_config=text), ("hidden_size",)) == 16
    assert (
        text_config_value(SimpleNamespace(n_positions=-1, seq_length=64), ("n_positions", "seq_length")) == 64
    )
    assert text_config_value(SimpleNamespace(hidden_size="32"), ("hidden_size",)) is None
    assert text_config_value(None, ("hidden_size",)) is None


def test_hidden_size_and_context_length_read_the_config(tiny_llama, tokenizer):
    assert hidden_size(locate_blocks(tiny_llama)) == tiny_llama.config.hidden_size
    assert model_context_length(tiny_llama, tokenizer) == tiny_llama.config.max_position_embeddings


def test_generate_steered_runs_a_prompt_far_longer_than_the_rest_alone(tiny_llama, tokenizer, monkeypatch):
    """Issue 20.1's class in generation: one long prompt left-padded every row of its batch to its length."""
    widths = []
    original = tiny_llama.generate

    def spy(**kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))
        return original(**kwargs)

    monkeypatch.setattr(tiny_llama, "generate", spy)
    prompts = [
        [{"role": "user", "content": text}] for text in ("kind words " * 40, "Hi", "Hello", "Hey there")
    ]
    out = generate_steered(tiny_llama, tokenizer, prompts, max_new_tokens=2, temperature=0.0, batch_size=4)
    assert [rows for rows, _ in widths] == [1, 3] and len(out) == 4


def test_a_prompt_with_no_room_for_its_answer_is_one_line(tiny_model_dirs):
    """Issue 20.1's class in generation: a prompt past the model's positions (256 here) failed deep in the model."""
    from persona.core.errors import PersonaError
    from persona.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dirs["gpt2"])
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "kind words " * 200}]]
    with pytest.raises(
        PersonaError, match=r"1 of 2 prompts \(the first: #1, \d+ tokens\) plus 4 new tokens pass"
    ):
        generate_steered(model, tok, prompts, max_new_tokens=4, temperature=0.0)
    assert len(generate_steered(model, tok, prompts[:1], max_new_tokens=4, temperature=0.0)) == 1
