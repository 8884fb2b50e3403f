"""Doses (issue 24): |coef|·‖v‖/mean‖h‖ — the unit, the norms in the sidecar, the guard, and every command's flags."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest
import torch

from conftest import ARCHITECTURES, build_tiny_model, hidden_states_without_final_norm
from persona.core.errors import PersonaError
from persona.steering import SteeringSpec, generate_steered, steer
from persona.vectors import load_metadata, save_vector
from persona.vectors.dose import (
    DEFAULT_MAX_DOSE,
    coef_to_dose,
    dose_to_coef,
    layer_norms,
    neutral_texts,
    norms_cache_path,
    resolve,
)

PROMPTS = ["Hello there, friend.", "Why did the chicken cross the road?"]


def random_vector(model, seed: int = 0) -> torch.Tensor:
    config = model.config
    rows = config.num_hidden_layers + 1
    return torch.randn(rows, config.hidden_size, generator=torch.Generator().manual_seed(seed))


def independent_norm(model, tokenizer, texts, layer: int, arch: str) -> float:
    """Mean ‖h_L‖ over every real token but the first, from HF hidden_states one text at a time (no hooks)."""
    norms = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")
        hidden = hidden_states_without_final_norm(model, arch, **ids)[layer][0]
        norms.append(hidden[1:].double().norm(dim=-1))
    return float(torch.cat(norms).mean())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_dose_and_its_coef_give_identical_tokens_and_zero_is_unsteered(arch, tokenizer):
    model = build_tiny_model(arch, len(tokenizer))
    vector, layer, dose = random_vector(model), 2, 0.8
    norm = independent_norm(model, tokenizer, neutral_texts()[:4], layer, arch)
    coef = dose_to_coef(dose, vector[layer], norm)
    assert coef == pytest.approx(dose * norm / float(vector[layer].norm()), rel=1e-6)
    relative = SteeringSpec(layer, vector, dose, relative=True, reference_norm=norm)
    raw = SteeringSpec(layer, vector, coef)
    kwargs = dict(max_new_tokens=6, temperature=0)
    by_dose = generate_steered(model, tokenizer, PROMPTS, [relative], **kwargs)
    by_coef = generate_steered(model, tokenizer, PROMPTS, [raw], **kwargs)
    plain = generate_steered(model, tokenizer, PROMPTS, [], **kwargs)
    assert by_dose == by_coef
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**batch).logits
        with steer(model, [relative]):
            pushed = model(**batch).logits
        with steer(model, [raw]):
            assert torch.equal(model(**batch).logits, pushed)
        assert not torch.equal(pushed, reference) and plain is not None
        with steer(model, [SteeringSpec(layer, vector, dose_to_coef(0.0, vector[layer], norm))]):
            assert torch.equal(model(**batch).logits, reference)


def test_extraction_records_the_mean_residual_norms_of_its_own_forward(tiny_model_dirs, tmp_path):
    from persona.commands.extract import extract
    from persona.data.examples import contrastive_pair_examples
    from persona.models import load_model_and_tokenizer

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Question {i}?", "positive": f"Cruel answer number {i}.", "negative": f"Kind reply {i}."}
        for i in range(4)
    ]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    extract(model=tiny_model_dirs["llama"], pairs_path=str(pairs), trait="t", save_dir=str(tmp_path / "v"))
    meta = load_metadata(tmp_path / "v" / "t_response_avg_diff.pt")
    model, tokenizer = load_model_and_tokenizer(tiny_model_dirs["llama"])
    # Independently: the same chat-formatted examples, one at a time, through HF hidden_states.
    from persona.data.batches import tokenize_examples

    items = tokenize_examples(contrastive_pair_examples(pairs, tokenizer), tokenizer)
    per_layer = [[] for _ in meta["mean_residual_norms"]]
    for item in items:
        ids = torch.tensor([item.input_ids])
        hidden = hidden_states_without_final_norm(model, "llama", input_ids=ids)
        for layer, states in enumerate(hidden):
            per_layer[layer].append(states[0, 1:].double().norm(dim=-1))
    expected = [float(torch.cat(values).mean()) for values in per_layer]
    assert meta["mean_residual_norms"] == pytest.approx(expected, rel=1e-4)
    assert "extraction" in meta["mean_residual_norms_source"]


def test_an_old_file_gets_norms_measured_once_and_cached(tiny_model_dirs, tmp_path, tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    path = save_vector(random_vector(model), tmp_path / "old_response_avg_diff.pt", {"trait": "old"})
    with pytest.raises(PersonaError, match="no mean_residual_norms .* Fix: pass --model"):
        layer_norms(path, model=None)
    norms = layer_norms(path, model=tiny_model_dirs["llama"])
    assert norms[3] == pytest.approx(
        independent_norm(model, tokenizer, neutral_texts(), 3, "llama"), rel=1e-4
    )
    assert norms_cache_path(path).is_file()
    assert layer_norms(path, model=None) == norms  # from the cache, no model needed


def test_the_guard_and_the_one_of_rule_answer_in_one_line(tmp_path):
    vector = torch.ones(4, 8)
    path = save_vector(vector, tmp_path / "v.pt", {})
    norms = [10.0] * 4
    with pytest.raises(PersonaError, match=r"--coef and --dose were both given\. Fix"):
        resolve(path, vector[1], 1, norms, coef=1.0, dose=0.1)
    with pytest.raises(
        PersonaError, match=r"--dose=1\.5 exceeds the dose limit 1 \(the default limit\).*--allow_high"
    ):
        resolve(path, vector[1], 1, norms, dose=1.5)
    coef, dose = resolve(path, vector[1], 1, norms, dose=1.5, force=True)
    assert coef == pytest.approx(1.5 * 10 / 8**0.5) and dose == 1.5
    assert resolve(path, vector[1], 1, norms, coef=2.0) == (
        2.0,
        pytest.approx(coef_to_dose(2.0, vector[1], 10.0)),
    )
    # A calibrated layer's limit is its calibrated dose.
    meta = load_metadata(path) | {"calibration": {"layers": {"1": {"dose": 0.2}}}}
    save_vector(vector, path, meta)
    with pytest.raises(PersonaError, match=r"limit 0\.2 \(calibrated at layer 1"):
        resolve(path, vector[1], 1, norms, dose=0.3)
    assert DEFAULT_MAX_DOSE == 1.0


COEF_FLAGS = {"coef": "dose", "coefs": "doses", "steering_coef": "steering_dose"}


def test_every_command_that_takes_a_coefficient_takes_a_dose():
    """Walks every command's flags (and the serve schema, and the study's sizes): a coef flag has a dose flag."""
    from persona.cli import SUBCOMMANDS
    from persona.serve.schema import SteerItem
    from persona.study.config import Sizes
    from persona.training.callbacks import PreventativeSteering

    checked = []
    for name, sub in SUBCOMMANDS.items():
        if sub.target == "lightning":
            continue
        module, _, function = sub.target.partition(":")
        params = inspect.signature(getattr(importlib.import_module(module), function)).parameters
        for coef, dose in COEF_FLAGS.items():
            # education's settings.relative already reads its coefficients as doses (README, education).
            if coef in params and name != "education":
                assert dose in params, f"persona {name} takes --{coef} but not --{dose}"
                checked.append(name)
    assert {"generate", "steer-eval", "export-gguf", "personality"} <= set(checked)
    assert {"coef", "dose", "force"} <= set(SteerItem.model_fields)
    assert {"coefs", "doses", "steering_coef", "steering_dose"} <= {f for f in Sizes.__dataclass_fields__}
    assert {"coef", "dose", "allow_high_dose"} <= set(inspect.signature(PreventativeSteering).parameters)


def test_preventative_steering_takes_a_dose(tokenizer, tmp_path):
    from persona.hooks import locate_blocks
    from persona.training.callbacks import PreventativeSteering

    model = build_tiny_model("llama", len(tokenizer))
    vector = random_vector(model)
    norms = [float(n) for n in torch.linspace(5, 20, vector.shape[0])]
    path = save_vector(vector, tmp_path / "v.pt", {"mean_residual_norms": norms})
    callback = PreventativeSteering(str(path), [1, 3], dose=0.4)
    callback._load_files()
    callback._prepare(locate_blocks(model))
    for layer in (1, 3):
        coef = 0.4 * norms[layer] / float(vector[layer].double().norm())
        assert callback.strengths[layer] == (pytest.approx(coef, rel=1e-6), 0.4)
    assert [spec.coef for spec in callback._specs] == [callback.strengths[1][0], callback.strengths[3][0]]
    with pytest.raises(PersonaError, match=r"PreventativeSteering\.dose=2 exceeds .*allow_high_dose"):
        too_high = PreventativeSteering(str(path), [1], dose=2.0)
        too_high._load_files()
        too_high._prepare(locate_blocks(model))
    with pytest.raises(
        PersonaError, match="PreventativeSteering.coef and PreventativeSteering.dose were both"
    ):
        PreventativeSteering(str(path), [1], coef=1.0, dose=0.1)
