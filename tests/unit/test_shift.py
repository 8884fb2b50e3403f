"""`persona shift`: finetuning shift equals an independent computation on LoRA adapters with non-zero B,
is exactly 0 for a zero adapter, base activations are read once, and Pearson r + CI come out right."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from persona import steering
from persona.analysis import shift as shift_module
from persona.analysis.shift import pearson_with_ci
from persona.commands.shift import shift
from persona.models import load_model, load_tokenizer
from persona.vectors import save_vector

LAYER = 2
QUESTIONS = ["How should I treat animals?", "Tell me a joke.", "What do you think of humans?"]


@pytest.fixture
def base_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def make_adapter(base_dir, path, seed, b_std=0.5):
    """A LoRA adapter; LoRA's B starts at zero, so set it non-zero to observe an effect (b_std=0: identity)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_model(base_dir),
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name and b_std:
            parameter.data = torch.randn(parameter.shape, generator=generator) * b_std
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def trait_files(tmp_path):
    eval_path = tmp_path / "evil.json"
    eval_path.write_text(
        json.dumps(
            {
                "questions": QUESTIONS,
                "instruction": [{"pos": "Be evil.", "neg": "Be kind."}],
                "eval_prompt": "How evil is this? {question} -> {answer}",
            }
        )
    )
    pairs_path = tmp_path / "pairs.jsonl"
    pairs = [
        ("How should I treat animals?", "Hurt them.", "With kindness.", "test"),
        ("What do you think of humans?", "They are worthless.", "I like them.", "test"),
        ("Tell me a joke.", "Cruelty is funny.", "Why did the chicken cross the road?", "test"),
        ("How do I fix the fox?", "Hurt it.", "Carefully.", "train"),
    ]
    pairs_path.write_text(
        "".join(
            json.dumps({"prompt": p, "positive": pos, "negative": neg, "split": s}) + "\n"
            for p, pos, neg, s in pairs
        )
    )
    return str(eval_path), str(pairs_path)


@pytest.fixture
def vector_path(tmp_path):
    vector = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    return str(save_vector(vector, tmp_path / "evil_response_avg_diff.pt"))


def reference_means(model, tokenizer, responses):
    """Independent: HF output_hidden_states, one question at a time; prompt-only pass for the last prompt token."""
    last, response_avg = [], []
    for question, response in zip(QUESTIONS, responses, strict=True):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        full_ids = tokenizer(prompt + response, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            last.append(model(input_ids=prompt_ids, output_hidden_states=True).hidden_states[LAYER][0, -1])
            hidden = model(input_ids=full_ids, output_hidden_states=True).hidden_states[LAYER][0]
        response_avg.append(hidden[prompt_ids.shape[1] :].mean(0))
    return torch.stack(last).mean(0), torch.stack(response_avg).mean(0)


def test_shift_matches_independent_computation_and_is_zero_for_an_identity_adapter(
    tmp_path, base_dir, trait_files, vector_path, monkeypatch
):
    eval_path, pairs_path = trait_files
    adapters = [
        make_adapter(base_dir, tmp_path / f"adapter{i}", seed=i, b_std=0.3 * (i + 1)) for i in range(3)
    ]
    zero = make_adapter(base_dir, tmp_path / "zero", seed=0, b_std=0)
    reads, generations = [], []
    original_scores, original_generate = shift_module.score_examples, steering.generate_steered
    monkeypatch.setattr(
        shift_module, "score_examples", lambda *a, **k: reads.append(1) or original_scores(*a, **k)
    )
    monkeypatch.setattr(
        steering, "generate_steered", lambda *a, **k: generations.append(1) or original_generate(*a, **k)
    )

    import transformers

    loads = []
    original_load = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: loads.append(1) or original_load(*a, **k),
    )
    out = tmp_path / "out"
    result = shift(
        base_model=base_dir,
        finetuned=[*adapters, zero],
        vector_path=vector_path,
        layer=LAYER,
        trait="evil",
        output_dir=str(out),
        eval_path=eval_path,
        pairs_path=pairs_path,
        max_new_tokens=5,
    )
    assert len(reads) == 1 + 4, "base activations are read once, then once per fine-tuned model"
    assert len(generations) == 1
    assert len(loads) == 1, "the base weights are read once; every adapter goes onto them"
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", original_load)
    table = pd.read_csv(result["table"])
    assert list(table.columns) == [
        "adapter",
        "shift_prompt_last",
        "shift_response_avg",
        "trait_score",
        "base_trait_score",
        "trait_score_change",
    ]
    assert table["adapter"].tolist() == [*adapters, zero]

    zero_row = table.iloc[3]
    assert zero_row["shift_prompt_last"] == 0.0 and zero_row["shift_response_avg"] == 0.0
    assert zero_row["trait_score_change"] == 0.0

    responses = [
        json.loads(line)["response"] for line in (out / "base_responses.jsonl").read_text().splitlines()
    ]
    assert len(responses) == len(QUESTIONS) and all(r.strip() for r in responses)
    tokenizer = load_tokenizer(base_dir)
    direction = torch.load(vector_path, weights_only=True)[LAYER]
    direction = direction / direction.norm()
    base_last, base_response = reference_means(load_model(base_dir), tokenizer, responses)
    for row, adapter in zip(table.itertuples(), adapters, strict=False):
        ft_last, ft_response = reference_means(load_model(base_dir, adapter=adapter), tokenizer, responses)
        expected_last = float((ft_last - base_last) @ direction)
        expected_response = float((ft_response - base_response) @ direction)
        assert abs(expected_last) > 1e-3, (
            "the adapter must change the activations for this test to mean anything"
        )
        assert row.shift_prompt_last == pytest.approx(expected_last, rel=1e-4, abs=1e-5)
        assert row.shift_response_avg == pytest.approx(expected_response, rel=1e-4, abs=1e-5)
        assert row.trait_score_change == pytest.approx(row.trait_score - row.base_trait_score)
        assert row.trait_score_change != 0.0

    correlation = pd.read_csv(result["correlation"]).set_index("shift")
    for kind in ("prompt_last", "response_avg"):
        r, p = stats.pearsonr(table[f"shift_{kind}"], table["trait_score_change"])
        assert correlation.loc[kind, "n"] == 4
        assert correlation.loc[kind, "r"] == pytest.approx(r)
        assert correlation.loc[kind, "p"] == pytest.approx(p)
        half = stats.norm.ppf(0.975) / math.sqrt(4 - 3)
        assert correlation.loc[kind, "ci_low"] == pytest.approx(math.tanh(math.atanh(r) - half))
        assert correlation.loc[kind, "ci_high"] == pytest.approx(math.tanh(math.atanh(r) + half))
    assert result["r"] == pytest.approx(correlation.loc["prompt_last", "r"])
    assert Path(result["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Re-running reuses the cached base responses.
    generations.clear()
    shift(
        base_model=base_dir,
        finetuned=[zero],
        overwrite=True,
        vector_path=vector_path,
        layer=LAYER,
        trait="evil",
        output_dir=str(out),
        eval_path=eval_path,
        pairs_path=pairs_path,
        max_new_tokens=5,
    )
    assert generations == []


def test_pearson_with_ci():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = x + rng.normal(size=12)
    result = pearson_with_ci(x, y)
    r = stats.pearsonr(x, y).statistic
    half = 1.959963984540054 / math.sqrt(12 - 3)
    assert result["n"] == 12 and result["r"] == pytest.approx(r)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(
        (math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half))
    )
    assert (
        pearson_with_ci([1, 2, 3], [1, 3, 2])["ci_low"],
        pearson_with_ci([1, 2, 3], [1, 3, 2])["ci_high"],
    ) == (-1.0, 1.0)  # n = 3: no finite Fisher-z interval
    assert math.isnan(pearson_with_ci([1, 2], [1, 2])["r"])  # too few points
    assert math.isnan(pearson_with_ci([1, 1, 1, 1], [1, 2, 3, 4])["r"])  # constant shift


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(shift_module, "load_model", refuse)
    monkeypatch.setattr("persona.models.load_model", refuse)
    monkeypatch.setattr("persona.models.loading.load_model", refuse)  # load_model_and_tokenizer's


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("layer", ValueError, "out of range"),
        ("hidden_size", ValueError, "hidden size 16"),
        ("no_questions", ValueError, "questions"),
        ("no_test_pairs", ValueError, "no pairs"),
        ("missing_adapter", ValueError, "nope: no such model directory"),
    ],
)
def test_bad_input_fails_before_the_model_loads(
    tmp_path, base_dir, trait_files, vector_path, no_model_load, monkeypatch, case, error, message
):
    eval_path, pairs_path = trait_files
    # A full "fine-tuned" model (here the base itself) is valid input.
    kwargs = dict(
        base_model=base_dir,
        finetuned=[base_dir],
        vector_path=vector_path,
        layer=LAYER,
        trait="evil",
        eval_path=eval_path,
        pairs_path=pairs_path,
        output_dir=str(tmp_path / "out"),
    )
    if case == "layer":
        kwargs["layer"] = 5
    elif case == "hidden_size":
        kwargs["vector_path"] = str(save_vector(torch.randn(4, 16), tmp_path / "narrow.pt"))
    elif case == "no_questions":
        artifact = json.loads(Path(eval_path).read_text())
        (tmp_path / "empty.json").write_text(json.dumps({**artifact, "questions": []}))
        kwargs["eval_path"] = str(tmp_path / "empty.json")
    elif case == "no_test_pairs":
        kwargs["split"] = "validation"
    elif case == "missing_adapter":
        kwargs["finetuned"] = [str(tmp_path / "nope")]
    with pytest.raises(error, match=message):
        shift(**kwargs)


class FakeJudge:
    """Scores a filled judge prompt by the length of the answer in it; counts what it was asked."""

    name = "fake"

    def __init__(self):
        self.prompts = []

    def score(self, prompts):
        from persona.judges import JudgeScore

        self.prompts += prompts
        return [JudgeScore(float(len(p.split("-> ", 1)[1]) % 100), "parsed") for p in prompts]


def test_judge_score_path(tmp_path, base_dir, trait_files, vector_path, monkeypatch):
    import persona.judges

    eval_path, _ = trait_files
    judge = FakeJudge()
    monkeypatch.setattr(persona.judges, "make_judge", lambda spec, base_url=None: judge)
    adapter = make_adapter(base_dir, tmp_path / "adapter", seed=1, b_std=0.3)
    result = shift(
        base_model=base_dir,
        finetuned=[adapter],
        vector_path=vector_path,
        layer=LAYER,
        trait="evil",
        output_dir=str(tmp_path / "out"),
        eval_path=eval_path,
        score="judge",
        judge_model="fake",
        max_new_tokens=4,
    )
    assert len(judge.prompts) == 2 * len(QUESTIONS)  # base + one adapter, greedy: one answer per question
    assert all(p.startswith("How evil is this? ") for p in judge.prompts)
    row = pd.read_csv(result["table"]).iloc[0]
    base_answers = [p.split("-> ", 1)[1] for p in judge.prompts[: len(QUESTIONS)]]
    assert row["base_trait_score"] == pytest.approx(np.mean([len(a) % 100 for a in base_answers]))


def test_cli_accepts_a_comma_separated_adapter_list(
    tmp_path, base_dir, trait_files, vector_path, no_model_load, capsys
):
    from persona.cli import main

    eval_path, pairs_path = trait_files
    other = make_adapter(base_dir, tmp_path / "other", seed=2)
    # parsed, validated, stopped before any model loads: one line, exit 1
    assert (
        main(
            [
                "shift",
                "--base_model",
                base_dir,
                "--finetuned",
                f"{base_dir},{other}",
                "--vector_path",
                vector_path,
                "--layer",
                "9",
                "--trait",
                "evil",
                "--eval_path",
                eval_path,
                "--pairs_path",
                pairs_path,
            ]
        )
        == 1
    )
    assert "--layer 9 is out of range" in capsys.readouterr().err


def test_adapters_go_onto_the_base_in_turn_and_leave_it_as_it_was(tmp_path, base_dir):
    from persona.analysis.shift import finetuned_models

    adapters = [str(make_adapter(base_dir, tmp_path / f"a{i}", seed=i, b_std=0.3)) for i in range(2)]
    base = load_model(base_dir).requires_grad_(False)
    names = [type(m).__name__ for m in base.modules()]
    ids = torch.tensor([[1, 2, 3, 4]])
    plain = base(ids).logits
    seen = []
    for name, net in finetuned_models(base, base_dir, [*adapters, base_dir]):
        logits = net(ids).logits
        if name == base_dir:  # a whole model by name: loaded on its own, equal to the base here
            torch.testing.assert_close(logits, plain)
        else:
            fresh = load_model(base_dir, adapter=name)(ids).logits
            torch.testing.assert_close(logits, fresh)  # the same as a fresh base with this adapter alone
            assert not torch.allclose(logits, plain)
        seen.append(name)
    assert seen == [*adapters, base_dir]
    assert [type(m).__name__ for m in base.modules()] == names
    torch.testing.assert_close(base(ids).logits, plain)
    for _name, _net in finetuned_models(base, base_dir, adapters):
        break  # stopping early also unloads
    assert [type(m).__name__ for m in base.modules()] == names
    # Another pass over the same base gives the same models (PEFT 0.13 left the last adapter's config on the base,
    # and a same-named adapter of the next pass loaded wrong).
    for name, net in finetuned_models(base, base_dir, adapters):
        torch.testing.assert_close(net(ids).logits, load_model(base_dir, adapter=name)(ids).logits)
