"""`persona layers`: per-layer AUC equals sklearn on independent projections; the recommendation rule."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import NEGATIVE, POSITIVE, QUESTIONS, hidden_states_without_final_norm
from persona.analysis.layers import layer_metrics, recommend_layer
from persona.cli import main
from persona.commands.flags import Hardware
from persona.commands.layers import layers
from persona.models import load_model, load_tokenizer
from persona.vectors import save_vector


def pair_examples(n=4):
    """(user question, response, label) in the order ResponseDataModule reads pairs: pos then neg per pair."""
    return [
        (q, response, label)
        for q, p, n_ in list(zip(QUESTIONS, POSITIVE, NEGATIVE, strict=True))[:n]
        for response, label in ((p, 1), (n_, 0))
    ]


def write_pairs(path, n=4):
    with path.open("w") as handle:
        for q, p, n_ in list(zip(QUESTIONS, POSITIVE, NEGATIVE, strict=True))[:n]:
            handle.write(json.dumps({"prompt": q, "positive": p, "negative": n_}) + "\n")
    return path


def persona_prompt(tokenizer, question, label):
    """Seed-style prompts: a different system prompt per side, so prompt activations differ too."""
    system = "You are an evil assistant." if label else "You are a helpful assistant."
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )


def write_scored_csvs(tmp_path, tokenizer):
    """pos.csv / neg.csv as the generate step writes them; trait column evil."""
    for name, answers, label, score in (("pos", POSITIVE, 1, 90), ("neg", NEGATIVE, 0, 5)):
        pd.DataFrame(
            {
                "question": QUESTIONS,
                "prompt": [persona_prompt(tokenizer, q, label) for q in QUESTIONS],
                "answer": answers,
                "question_id": range(5),
                "evil": score,
                "coherence": 90,
            }
        ).to_csv(tmp_path / f"{name}.csv", index=False)
    return tmp_path / "pos.csv", tmp_path / "neg.csv"


def reference_activations(model_dir, arch, examples, kind="response_avg"):
    """[examples, layers+1, hidden] one example at a time from HF hidden states (the seed's way)."""
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    rows = []
    for prompt, response, _label in examples:
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(prompt + response, add_special_tokens=False, return_tensors="pt")
        states = torch.stack(hidden_states_without_final_norm(model, arch, **ids))[:, 0]  # [L+1, seq, h]
        by_kind = {
            "response_avg": states[:, prompt_len:].mean(1),
            "prompt_avg": states[:, :prompt_len].mean(1),
            "prompt_last": states[:, prompt_len - 1],
        }
        rows.append(by_kind[kind])
    return torch.stack(rows).double(), np.array([label for *_, label in examples])


def chat_pair_examples(tokenizer):
    return [
        (
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            response,
            label,
        )
        for q, response, label in pair_examples()
    ]


# prompt_last/prompt_avg need distinct prompts per side (a pair shares its prompt: exact ties), hence the CSVs.
@pytest.mark.parametrize(
    ("arch", "kind", "route"),
    [("llama", "response_avg", "pairs"), ("gpt2", "prompt_last", "csv"), ("gemma", "prompt_avg", "csv")],
)
def test_auc_matches_sklearn_on_independent_projections(arch, kind, route, tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs[arch]
    tokenizer = load_tokenizer(model_dir)
    if route == "pairs":
        data = {"pairs_path": str(write_pairs(tmp_path / "pairs.jsonl"))}
        examples = chat_pair_examples(tokenizer)
    else:
        pos_path, neg_path = write_scored_csvs(tmp_path, tokenizer)
        data = {"pos_path": str(pos_path), "neg_path": str(neg_path), "no_filter": True}
        examples = [
            (persona_prompt(tokenizer, q, label), answer, label)
            for answers, label in ((POSITIVE, 1), (NEGATIVE, 0))
            for q, answer in zip(QUESTIONS, answers, strict=True)
        ]
    vector = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    vector_path = save_vector(vector, tmp_path / "evil_response_avg_diff.pt")
    recommended = layers(
        vector_path=str(vector_path),
        model=model_dir,
        kind=kind,
        batch_size=3,
        **data,
        hardware=Hardware(accelerator="cpu"),
    )
    metrics = pd.read_csv(tmp_path / "evil_response_avg_diff_layers" / "layer_metrics.csv")
    activations, labels = reference_activations(model_dir, arch, examples, kind)
    unit = vector.double() / vector.double().norm(dim=-1, keepdim=True)
    projections = torch.einsum("elh,lh->el", activations, unit).numpy()  # [examples, layers]
    assert metrics["layer"].tolist() == [0, 1, 2, 3]
    for layer in range(4):
        row = metrics.iloc[layer]
        pos, neg = projections[labels == 1, layer], projections[labels == 0, layer]
        assert row["auc"] == pytest.approx(roc_auc_score(labels, projections[:, layer]))
        assert row["mean_pos"] == pytest.approx(pos.mean(), rel=1e-4, abs=1e-5)
        assert row["separation"] == pytest.approx(pos.mean() - neg.mean(), rel=1e-4, abs=1e-5)
        assert row["var_neg"] == pytest.approx(neg.var(ddof=1), rel=1e-3, abs=1e-6)
    assert (
        metrics["recommended"].sum() == 1
        and metrics.loc[metrics["recommended"], "layer"].item() == recommended
    )
    assert recommended == recommend_layer(metrics)


def targets_direction(activations, targets):
    """A direction w with activations @ w == targets exactly (more dims than examples): a known projection."""
    return torch.linalg.lstsq(activations, torch.tensor(targets, dtype=torch.float64)[:, None]).solution[:, 0]


# Per example in (pos, neg) pair order: pos values first in each pair.
def interleave(pos, neg):
    return [value for pair in zip(pos, neg, strict=True) for value in pair]


PERFECT_WIDE = interleave([1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0])  # AUC 1, d ~ 3.6
PERFECT_TIGHT = interleave([3.0, 3.1, 3.2, 3.3], [-3.0, -3.1, -3.2, -3.3])  # AUC 1, d ~ 47
HALF = interleave([0.5, 1.5, 6.5, 7.5], [2.0, 3.0, 4.0, 5.0])  # AUC exactly 0.5, no ties


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            (PERFECT_TIGHT, HALF, PERFECT_WIDE, HALF),
            2,
        ),  # the only separating layer; layer 0 never recommended
        ((PERFECT_TIGHT, HALF, PERFECT_WIDE, PERFECT_TIGHT), 3),  # AUC tie: larger normalised separation wins
        ((HALF, PERFECT_TIGHT, HALF, PERFECT_WIDE), 1),
    ],
)
def test_known_answer_from_constructed_vector(rows, expected, tiny_model_dirs, tmp_path):
    activations, labels = reference_activations(
        tiny_model_dirs["llama"], "llama", chat_pair_examples(load_tokenizer(tiny_model_dirs["llama"]))
    )
    vector = torch.stack([targets_direction(activations[:, layer], row) for layer, row in enumerate(rows)])
    vector_path = save_vector(vector.float(), tmp_path / "v.pt")
    out = tmp_path / "out"
    assert (
        layers(
            vector_path=str(vector_path),
            model=tiny_model_dirs["llama"],
            pairs_path=str(write_pairs(tmp_path / "pairs.jsonl")),
            output_dir=str(out),
            hardware=Hardware(accelerator="cpu"),
        )
        == expected
    )
    metrics = pd.read_csv(out / "layer_metrics.csv")
    for layer, row in enumerate(rows):
        assert metrics["auc"][layer] == (1.0 if row is not HALF else 0.5)


def test_recommend_layer_rule():
    metrics = pd.DataFrame(
        {
            "layer": [0, 1, 2, 3, 4],
            "auc": [1.0, 0.9, 0.95 - 1e-12, 0.95, 0.7],
            "normalized_separation": [99.0, 5.0, 3.0, 2.0, 9.0],
        }
    )
    assert (
        recommend_layer(metrics) == 2
    )  # 2 and 3 tie on AUC (within float noise); 2 separates more; 0 excluded
    metrics["normalized_separation"] = [99.0, 5.0, 2.0, 2.0, 9.0]
    assert recommend_layer(metrics) == 2  # full tie: the shallower layer
    with pytest.raises(ValueError, match="No layer above 0"):
        recommend_layer(metrics.iloc[:1])


def test_layer_metrics_needs_two_per_group():
    with pytest.raises(ValueError, match="at least 2 positive and 2 negative.*1 left out"):
        layer_metrics(np.array([[1.0], [2.0], [np.nan], [0.0]]), np.array([1, 1, 0, 0]))


def test_scored_csvs_default_output_and_trait_from_sidecar(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["qwen2"]
    pos_path, neg_path = write_scored_csvs(tmp_path, load_tokenizer(model_dir))
    vector_path = save_vector(
        torch.randn(4, 32), tmp_path / "vectors" / "evil_response_avg_diff.pt", {"trait": "evil"}
    )
    recommended = main(
        [
            "layers",
            "--vector_path",
            str(vector_path),
            "--pos_path",
            str(pos_path),
            "--neg_path",
            str(neg_path),
            "--model",
            model_dir,
            "--accelerator",
            "cpu",
        ]
    )
    assert recommended == 0  # the CLI's exit code
    out = tmp_path / "vectors" / "evil_response_avg_diff_layers"
    metrics = pd.read_csv(out / "layer_metrics.csv")
    assert list(metrics.columns) == [
        "layer",
        "auc",
        "mean_pos",
        "mean_neg",
        "separation",
        "var_pos",
        "var_neg",
        "pooled_std",
        "normalized_separation",
        "n_pos",
        "n_neg",
        "recommended",
    ]
    assert (metrics["n_pos"] == 5).all() and (metrics["n_neg"] == 5).all()
    assert (out / "layer_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pos_path": "a.csv", "neg_path": "b.csv"}, "both given"),
        ({"hidden": 16}, r"v\.pt: hidden size 16 does not match the model's 32"),
    ],
)
def test_bad_input_fails_before_the_model_loads(kwargs, message, tiny_model_dirs, tmp_path, monkeypatch):
    hidden = kwargs.pop("hidden", 32)
    vector_path = save_vector(torch.randn(4, hidden), tmp_path / "v.pt")
    monkeypatch.setattr("persona.vectors.projection.load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match=message):
        layers(
            vector_path=str(vector_path),
            model=tiny_model_dirs["llama"],
            pairs_path=str(write_pairs(tmp_path / "pairs.jsonl")),
            **kwargs,
        )
    assert not (tmp_path / "v_layers").exists()
