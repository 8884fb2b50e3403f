"""On the embedded model the method works: held-out separation and monotone steering of preferences."""

from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from persona.analysis.likelihood import pair_preference
from persona.commands.extract import extract
from persona.commands.flags import Hardware
from persona.data.batches import collate, tokenize_examples
from persona.data.examples import contrastive_pair_examples
from persona.hooks import block_hooks
from persona.hooks.operators import add_direction, project
from persona.vectors import load_vector
from persona.vectors.activations import read_example_means

PAIRS = Path(__file__).resolve().parents[2] / "datasets" / "pairs" / "evil.jsonl"
MIDDLE_LAYERS = range(10, 21)


@pytest.fixture(scope="module")
def evil_vector(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("vectors")
    paths = extract(
        model="smollm2-135m",
        pairs_path=str(PAIRS),
        split="train",
        trait="evil",
        save_dir=str(save_dir),
        hardware=Hardware(accelerator="cpu"),
    )
    return load_vector(paths["response_avg"], hidden_size=576, num_layers=30)


def held_out_projections(model, tokenizer, vector, layers):
    examples = contrastive_pair_examples(PAIRS, tokenizer, split="test")
    batch = collate(tokenize_examples(examples, tokenizer), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        means = read_example_means(model, batch, list(layers), kinds=("response_avg",))["response_avg"]
    scores = torch.stack([project(means[:, slot], vector[layer]) for slot, layer in enumerate(layers)], dim=1)
    return scores, batch["labels"]


def test_held_out_auc_at_middle_layers(smollm2, evil_vector):
    model, tokenizer = smollm2
    scores, labels = held_out_projections(model, tokenizer, evil_vector, MIDDLE_LAYERS)
    aucs = {
        layer: roc_auc_score(labels.numpy(), scores[:, slot].numpy())
        for slot, layer in enumerate(MIDDLE_LAYERS)
    }
    assert max(aucs.values()) >= 0.9, aucs


def test_adding_the_vector_shifts_preferences_monotonically(smollm2, evil_vector):
    model, tokenizer = smollm2
    examples = contrastive_pair_examples(PAIRS, tokenizer, split="test")
    layer = 15
    vector = evil_vector[layer]
    preferences = []
    for coef in (-2.0, -1.0, 0.0, 1.0, 2.0):
        with block_hooks(model, [(layer, lambda h, s, c=coef: add_direction(h, vector, c))]):
            preferences.append(float(pair_preference(model, tokenizer, examples).mean()))
    assert all(a < b for a, b in zip(preferences, preferences[1:], strict=False)), preferences
