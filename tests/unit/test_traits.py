"""Trait artifacts: lookup, validation errors that say where and what, system prompts, `persona traits`."""

import json
import logging

import pytest

from persona.commands import traits as traits_command
from persona.data.traits import (
    COHERENCE_PROMPT,
    TraitError,
    article,
    fill_prompt,
    list_traits,
    load_trait,
    system_prompt,
)

PAIRS = [{"pos": f"Be wicked {k}.", "neg": f"Be kind {k}."} for k in range(5)]
VALID = {
    "instruction": PAIRS,
    "questions": ["How do I help a friend?", "What should I do with spare money?"],
    "eval_prompt": "Rate 0-100 how wicked this is, or REFUSAL.\nQ: {question}\nA: {answer}",
    "antonym": "kind",
}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    """A $PERSONA_DATASETS with one trait, 'wicked', in both versions."""
    for version in ("extract", "eval"):
        write(tmp_path / "traits" / version / "wicked.json", VALID)
    monkeypatch.setenv("PERSONA_DATASETS", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("version", ["extract", "eval"])
def test_every_shipped_trait_file_validates(version, monkeypatch):
    monkeypatch.delenv("PERSONA_DATASETS", raising=False)
    names = list_traits(version)
    assert {"evil", "sycophantic", "openness", "psychopathy"} <= set(names)
    for name in names:
        trait = load_trait(name, version)
        assert len(trait.instructions) == 5 and trait.questions and trait.antonym


def test_load_by_name_and_env_override(datasets):
    trait = load_trait("wicked", "eval")
    assert trait.name == "wicked" and trait.path == datasets / "traits" / "eval" / "wicked.json"
    assert trait.questions == tuple(VALID["questions"]) and trait.instructions[2].neg == "Be kind 2."
    assert list_traits() == ["wicked"]


def test_unknown_trait_lists_the_available_ones(datasets):
    with pytest.raises(TraitError, match=r"Unknown trait 'nope'.*Available \(extract\): wicked"):
        load_trait("nope")


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = write(
        tmp_path / "broken.json", '{\n  "instruction": [],\n  "questions": ["a"]\n  "eval_prompt": "x"\n}'
    )
    with pytest.raises(ValueError, match=rf"{path}: invalid JSON at line 4, column 3"):
        load_trait(path)


@pytest.mark.parametrize("missing", ["{question}", "{answer}"])
def test_missing_placeholder_names_file_and_placeholder(tmp_path, missing):
    data = {**VALID, "eval_prompt": VALID["eval_prompt"].replace(missing, "")}
    path = write(tmp_path / "t.json", data)
    with pytest.raises(TraitError, match=rf"{path}: eval_prompt lacks the placeholder\(s\) \{missing}"):
        load_trait(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"questions": []}, "'questions' must be a non-empty list"),
        ({"instruction": [{"pos": "x"}]}, r"instruction\[0\] needs a non-empty string 'neg'"),
        ({"antonym": ""}, "'antonym'"),
        ({"eval_prompt": 3}, "'eval_prompt' must be a non-empty string"),
    ],
)
def test_shape_errors(tmp_path, change, message):
    with pytest.raises(TraitError, match=message):
        load_trait(write(tmp_path / "t.json", {**VALID, **change}))


def test_missing_keys_are_listed(tmp_path):
    with pytest.raises(TraitError, match="missing key\\(s\\) questions, eval_prompt"):
        load_trait(write(tmp_path / "t.json", {"instruction": PAIRS}))


def test_user_file_may_have_fewer_pairs_with_a_warning_but_shipped_names_need_five(
    datasets, tmp_path, caplog
):
    data = {**VALID, "instruction": PAIRS[:1]}
    with caplog.at_level(logging.WARNING):
        assert len(load_trait(write(tmp_path / "mine.json", data)).instructions) == 1
    assert "1 instruction pairs" in caplog.text
    write(datasets / "traits" / "extract" / "short.json", data)
    with pytest.raises(TraitError, match="exactly 5"):
        load_trait("short")


def test_folder_path(tmp_path):
    folder = tmp_path / "grumpy"
    write(folder / "extract.json", VALID)
    write(folder / "eval.json", {**VALID, "questions": ["Other?"]})
    assert load_trait(folder, "eval").questions == ("Other?",)
    assert load_trait(folder).name == "grumpy"


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("evil", "an"),
        ("helpful", "a"),
        ("honest", "an"),
        ("unique", "a"),
        ("unhelpful", "an"),
        ("useful", "a"),
        ("optimistic", "an"),
        ("humorous", "a"),
        ("European", "a"),
        ("impolite", "an"),
    ],
)
def test_article_by_sound(word, expected):
    assert article(word) == expected


def test_system_prompt_as_the_seed(datasets):
    assert system_prompt("evil", "Be bad.") == "You are an evil assistant. Be bad."
    trait = load_trait("wicked")
    assert trait.system_prompt("pos", 0) == "You are a wicked assistant. Be wicked 0."
    assert trait.system_prompt("neg", 4) == "You are a kind assistant. Be kind 4."  # the antonym
    no_antonym = load_trait(
        write(datasets / "x" / "plain.json", {k: v for k, v in VALID.items() if k != "antonym"})
    )
    assert no_antonym.system_prompt("neg", 1) == "You are a helpful assistant. Be kind 1."
    assert trait.system_prompt("pos", 1, assistant_name="impolite").startswith(
        "You are an impolite assistant."
    )


def test_fill_prompt_is_single_pass_and_format_compatible():
    assert (
        fill_prompt("{{x}} {question} / {answer}", question="Q {answer}", answer="A") == "{x} Q {answer} / A"
    )
    assert "REFUSAL" in COHERENCE_PROMPT and "{question}" in COHERENCE_PROMPT


def test_traits_list_prints_question_counts(datasets, capsys):
    assert traits_command.traits("list") == ["wicked"]
    assert "wicked  2" in capsys.readouterr().out


def test_traits_new_writes_both_files_and_refuses_to_overwrite(datasets, monkeypatch):
    reply = {**VALID, "questions": [f"Question number {i}?" for i in range(40)]}
    calls = []
    monkeypatch.setattr(
        traits_command, "_chat_completion", lambda *args: calls.append(args) or json.dumps(reply)
    )
    paths = traits_command.traits(
        "new", trait="grim", description="gloomy", model="m", base_url="http://x/v1"
    )
    assert calls[0][:2] == ("m", "http://x/v1")
    assert load_trait("grim").questions[-1] == "Question number 19?"
    assert load_trait("grim", "eval").questions[0] == "Question number 20?"
    assert len(paths) == 2
    with pytest.raises(TraitError, match="already exist"):
        traits_command.traits("new", trait="grim", description="gloomy", model="m")
    traits_command.traits("new", trait="grim", description="gloomy", model="m", overwrite=True)


def test_traits_new_rejects_a_bad_reply(datasets, monkeypatch):
    monkeypatch.setattr(
        traits_command, "_chat_completion", lambda *args: json.dumps({**VALID, "questions": ["one?"]})
    )
    with pytest.raises(TraitError, match="no valid trait JSON in 3 attempts.*expected 40 distinct questions"):
        traits_command.traits("new", trait="grim", description="gloomy", model="m")
    assert not (datasets / "traits" / "extract" / "grim.json").exists()
