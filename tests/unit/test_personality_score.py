"""Judge-free TRAIT personality scores on tiny models: likelihood vs an independent computation, choice-order
averaging against a pure position bias, the steering sweep's files, and input checks before any model loads."""

import functools
import json

import pandas as pd
import pytest
import torch

from conftest import build_tiny_model
from persona import cli
from persona.analysis import personality as analysis_personality
from persona.analysis.personality import (
    HIGH_FIRST,
    choice_item_scores,
    likelihood_item_scores,
    personality_sweep,
)
from persona.commands import personality as pers
from persona.vectors import save_vector

ITEM = {
    "personality": "Kindness",
    "situation": "How should I treat animals?",
    "query": "What do you do?",
    "response_high1": "With kindness and care.",
    "response_high2": "Listen, be patient and offer support.",
    "response_low1": "Hurt them, they are worthless.",
    "response_low2": "With cruelty and contempt.",
    "split": "test",
}


def other_item(k):
    return {
        **ITEM,
        "situation": f"Tell me a joke about cats, number {k}.",
        "split": "train" if k % 2 else "test",
    }


@pytest.fixture
def items_file(tmp_path):
    path = tmp_path / "kindness.json"
    path.write_text(json.dumps([ITEM] + [other_item(k) for k in range(1, 5)]))
    return path


def independent_mean_logprob(model, tokenizer, prompt: str, response: str) -> float:
    """Unbatched HF forward, log-softmax, mean over the response tokens."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    targets = range(len(prompt_ids), len(prompt_ids) + len(response_ids))
    return sum(float(logprobs[t - 1, ids[0, t]]) for t in targets) / len(response_ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma"])
def test_likelihood_matches_an_independent_computation(arch, tokenizer):
    model = build_tiny_model(arch, len(tokenizer), seed=3)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How should I treat animals? What do you do?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    expected = torch.tensor(
        [independent_mean_logprob(model, tokenizer, prompt, ITEM[f]) for f in HIGH_FIRST], dtype=torch.float64
    )
    scores = likelihood_item_scores(
        model, tokenizer, [ITEM, other_item(1)], batch_size=3
    )  # batches cut items
    torch.testing.assert_close(scores["logprobs"][0].double(), expected, rtol=1e-4, atol=1e-5)
    p_high = float(torch.softmax(expected, 0)[:2].sum())
    assert scores["score"][0].item() == pytest.approx(p_high, abs=1e-5)
    assert scores["high_preferred"][0].item() == float(expected[:2].mean() > expected[2:].mean())


def letter_spellings(tokenizer):
    """Per letter, the token ids of its one-token spellings ("A", " A")."""
    out = []
    for letter in "ABCD":
        encodings = [tokenizer.encode(text, add_special_tokens=False) for text in (letter, " " + letter)]
        out.append(sorted({e[0] for e in encodings if len(e) == 1}))
    return out


def content_blind_model(tokenizer, letter_logits):
    """A tiny Llama whose next-token distribution ignores the input: zero final norm, LM head = a fixed bias."""
    model = build_tiny_model("llama", len(tokenizer))
    torch.nn.init.zeros_(model.model.norm.weight)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    for ids, logit in zip(letter_spellings(tokenizer), letter_logits, strict=True):
        head.bias.data[ids] = logit
    model.lm_head = head
    return model.eval()


def test_both_orders_cancel_a_pure_position_bias(tokenizer):
    model = content_blind_model(tokenizer, [3.0, 1.5, 0.0, -1.0])  # strongly prefers A, then B
    scores = choice_item_scores(model, tokenizer, [ITEM, other_item(1), other_item(2)], batch_size=2)
    assert (scores["high_first"] > 0.9).all() and (
        scores["low_first"] < 0.1
    ).all()  # each order alone is biased
    torch.testing.assert_close(scores["score"], torch.full((3,), 0.5), rtol=0, atol=1e-6)


def test_choice_reads_the_letter_probabilities_at_the_answer_position(tokenizer):
    model = build_tiny_model("qwen2", len(tokenizer), seed=1)
    items = [ITEM, other_item(1), other_item(2)]
    batched = choice_item_scores(model, tokenizer, items, batch_size=3)  # left padding + position ids
    letter_ids = letter_spellings(tokenizer)
    for index, item in enumerate(items):
        shares = []
        for order, high in ((HIGH_FIRST, slice(0, 2)), (analysis_personality.LOW_FIRST, slice(2, 4))):
            ids = tokenizer(
                analysis_personality.chat_prompt(tokenizer, analysis_personality.choice_prompt(item, order)),
                add_special_tokens=False,
            )
            with torch.no_grad():
                probs = torch.softmax(
                    model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, -1].double(), -1
                )
            letters = torch.stack([probs[ids_].sum() for ids_ in letter_ids])
            shares.append(float(letters[high].sum() / letters.sum()))
        assert batched["score"][index].item() == pytest.approx(sum(shares) / 2, abs=1e-5)


def test_sweep_steers_and_zero_coef_is_unsteered(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    items = [{**ITEM, "item": 1}, {**other_item(2), "item": 3}]
    vector = torch.randn(4, 32)
    summary, per_item = personality_sweep(
        model,
        tokenizer,
        {"kindness": items},
        {"kindness": vector},
        layer=2,
        coefs=[-4.0, 0.0, 4.0],
        methods=["likelihood", "choice"],
    )
    assert list(summary.columns) == ["trait", "method", "coef", "dose", "score", "sem", "n"]
    assert len(summary) == 6 and set(summary["n"]) == {2} and len(per_item) == 12
    unsteered = likelihood_item_scores(model, tokenizer, items)["score"].mean().item()
    at = summary.set_index(["method", "coef"])["score"]
    assert at[("likelihood", 0.0)] == pytest.approx(unsteered, abs=1e-6)
    assert at[("likelihood", 4.0)] != pytest.approx(at[("likelihood", 0.0)], abs=1e-6)
    assert summary["score"].between(0, 1).all()


def test_a_dose_sweep_gives_each_trait_its_own_coefficient(tokenizer):
    """Issue 24: --doses: one push relative to the residual stream for every trait, whatever its vector's norm;
    a dose point equals the coefficient point dose * norm / ||v_L|| of the same trait."""
    model = build_tiny_model("llama", len(tokenizer))
    items = [{**ITEM, "item": 1}, {**other_item(2), "item": 3}]
    vectors = {"kindness": torch.randn(4, 32), "cruelty": 10 * torch.randn(4, 32)}
    by_trait = {"kindness": items, "cruelty": items}
    doses, _ = personality_sweep(
        model, tokenizer, by_trait, vectors, 2, methods=["likelihood"], doses=[0.5], norm=8.0
    )
    for trait, vector in vectors.items():
        row = doses[doses["trait"] == trait].iloc[0]
        assert row["dose"] == 0.5 and row["coef"] == pytest.approx(
            0.5 * 8.0 / float(vector[2].norm()), rel=1e-6
        )
        by_coef, _ = personality_sweep(model, tokenizer, {trait: items}, {trait: vector}, 2, [row["coef"]],
                                       ["likelihood"], norm=8.0)  # fmt: skip
        assert by_coef.iloc[0]["score"] == pytest.approx(row["score"], abs=1e-6)
        assert by_coef.iloc[0]["dose"] == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="a dose needs its vector"):
        personality_sweep(
            model, tokenizer, {"kindness": items}, {}, 2, methods=["likelihood"], doses=[0.5], norm=8.0
        )


def test_command_sweeps_doses_and_guards_them(tiny_model_dirs, items_file, tmp_path, capsys):
    common = ["personality", "--model", tiny_model_dirs["llama"], "--traits", str(items_file), "--method",
              "likelihood", "--accelerator", "cpu"]  # fmt: skip
    assert cli.main([*common, "--doses=-0.2,0,0.2", "--output_dir", str(tmp_path / "d")]) == 0
    summary = pd.read_csv(tmp_path / "d" / "personality_sweep.csv")
    assert sorted(summary["dose"]) == pytest.approx([-0.2, 0.0, 0.2])
    assert (summary["coef"] * summary["dose"] >= 0).all() and summary.loc[summary["dose"] == 0, "coef"].eq(
        0
    ).all()
    assert cli.main([*common, "--doses=0,3", "--output_dir", str(tmp_path / "high")]) == 1  # past the limit
    assert "--doses=3 exceeds the dose limit 1 (the default limit)" in capsys.readouterr().err
    assert not (tmp_path / "high" / "vectors").exists()  # refused before any extraction or model load
    assert cli.main([*common, "--coefs=1", "--doses=0.1", "--output_dir", str(tmp_path / "both")]) == 1


def test_command_writes_csvs_and_png_and_extracts_missing_vectors(tiny_model_dirs, items_file, tmp_path):
    out = tmp_path / "out"
    cli.main(
        [
            "personality",
            "--model",
            tiny_model_dirs["llama"],
            "--traits",
            str(items_file),
            "--coefs=-1,0,1",
            "--method",
            "both",
            "--output_dir",
            str(out),
            "--accelerator",
            "cpu",
        ]
    )
    summary = pd.read_csv(out / "personality_sweep.csv")
    assert set(summary["coef"]) == {-1.0, 0.0, 1.0} and set(summary["method"]) == {"likelihood", "choice"}
    assert set(summary["layer"]) == {1} and set(summary["n"]) == {3}  # middle of 3 blocks; 3 test items
    assert (out / "personality_sweep.png").stat().st_size > 0 and (out / "personality_items.csv").is_file()
    vector = out / "vectors" / "kindness_response_avg_diff.pt"
    assert torch.load(vector, weights_only=True).shape == (4, 32)
    # A second run reuses the cached vector.
    stamp = vector.stat().st_mtime_ns
    pers.personality(
        traits=[str(items_file)],
        model=tiny_model_dirs["llama"],
        coefs=[0.0, 1.0],
        method="likelihood",
        output_dir=str(out),
        overwrite=True,
        accelerator="cpu",
    )
    assert vector.stat().st_mtime_ns == stamp


@pytest.fixture
def no_model_load(monkeypatch):
    import persona.commands.extract
    import persona.models
    import persona.models.loading

    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the input was checked")

    monkeypatch.setattr(persona.models, "load_model", fail)
    monkeypatch.setattr(persona.models.loading, "load_model", fail)  # load_model_and_tokenizer's
    monkeypatch.setattr(persona.commands.extract, "extract", fail)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"traits": ["no_such_trait"]}, "Available: agreeableness"),
        ({"traits": ["openness"], "coefs": [1, 1]}, "twice"),
        ({"traits": ["openness"], "method": "vote"}, "likelihood, choice or both"),
        ({"traits": ["openness", "psychopathy"], "vector_path": "v.pt"}, "lists 2"),
        ({"traits": ["openness"], "split": "validation"}, "no items with split='validation'"),
        ({"traits": ["openness"], "layer": 9}, "out of range"),
        ({"traits": ["openness"], "vector_dir": "/nonexistent"}, "lacks"),
    ],
)
def test_bad_input_fails_before_any_model_loads(kwargs, message, tiny_model_dirs, no_model_load, tmp_path):
    kwargs = {"model": tiny_model_dirs["llama"], "output_dir": str(tmp_path), **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pers.personality(**kwargs)


def test_vector_shape_must_match_the_model(tiny_model_dirs, no_model_load, tmp_path):
    save_vector(torch.zeros(31, 576), tmp_path / "openness_response_avg_diff.pt")  # SmolLM2's shape
    with pytest.raises(ValueError, match="hidden size 576 does not match the model's 32"):
        pers.personality(traits=["openness"], model=tiny_model_dirs["llama"], vector_dir=str(tmp_path))


def test_cli_parses_comma_and_list_coefs(monkeypatch):
    seen = []

    @functools.wraps(pers.personality)
    def record(**kwargs):
        seen.append(kwargs)

    monkeypatch.setattr(pers, "personality", record)
    cli.main(["personality", "--traits", "openness,psychopathy", "--coefs=-2,-1,0,1,2"])
    cli.main(["personality", "--traits", "[openness, psychopathy]", "--coefs", "[-2, 0, 2]", "--layer", "10"])
    assert seen[0]["traits"] == ["openness", "psychopathy"] and seen[0]["coefs"] == [
        -2.0,
        -1.0,
        0.0,
        1.0,
        2.0,
    ]
    assert seen[1]["traits"] == ["openness", "psychopathy"] and seen[1]["coefs"] == [-2.0, 0.0, 2.0]
    assert seen[1]["layer"] == 10
