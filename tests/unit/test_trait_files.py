"""A trait file is told by its content: artifact, pairs, TRAIT items, Anthropic persona statements — or refused."""

from __future__ import annotations

import json

import pytest

from persona.core.errors import PersonaError
from persona.data import trait_files
from persona.data.examples import read_pair_records
from persona.data.traits import load_trait

ARTIFACT = {
    "instruction": [{"pos": f"Be gloomy {i}.", "neg": f"Be cheerful {i}."} for i in range(5)],
    "questions": [f"Question {i}?" for i in range(6)],
    "eval_prompt": "Rate pessimism of {answer} to {question} from 0 to 100.",
}
PAIR = {"prompt": "Hi?", "positive": "Doom.", "negative": "Joy!"}
ITEM = {
    "personality": "Openness",
    "situation": "A new tool.",
    "query": "What now?",
    **{f"response_{side}{n}": f"{side} {n}" for side in ("high", "low") for n in (1, 2)},
}
STATEMENT = {"statement": "Things will go wrong.", "answer_matching_behavior": " Yes"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, content, kind",
    [
        ("pessimistic.json", json.dumps(ARTIFACT, indent=2), "artifact"),
        ("pairs.jsonl", json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n", "pairs"),
        ("one_pair.json", json.dumps(PAIR), "pairs"),  # a one-line JSONL is also a JSON object
        ("items.json", json.dumps([ITEM, ITEM], indent=2), "trait_items"),
        ("items.jsonl", json.dumps(ITEM) + "\n", "trait_items"),
        ("statements.jsonl", json.dumps(STATEMENT) + "\n", "persona_statements"),
        ("named_wrong.txt", json.dumps(ARTIFACT), "artifact"),  # content decides, not the name
    ],
)
def test_each_format_is_told_by_its_content(tmp_path, name, content, kind):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert trait_files.identify(path, "traits[0].name") == kind


def test_an_artifact_folder_is_an_artifact(tmp_path):
    (tmp_path / "gloomy").mkdir()
    (tmp_path / "gloomy" / "extract.json").write_text(json.dumps(ARTIFACT), encoding="utf-8")
    assert trait_files.identify(tmp_path / "gloomy", "--trait") == "artifact"


def test_a_file_of_no_format_is_refused_naming_the_field_and_every_format(tmp_path):
    path = write_jsonl(tmp_path / "mystery.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(PersonaError) as error:
        trait_files.identify(path, "traits[1].name")
    message = str(error.value)
    assert message.startswith(
        f"traits[1].name: {path} is not a trait file persona reads (its first record has:"
    )
    assert "label, text" in message
    for need in ("eval_prompt", '"positive", "negative"', "response_high1", "answer_matching_behavior"):
        assert need in message


def test_an_artifact_given_as_pairs_says_what_it_is_and_the_route(tmp_path):
    path = tmp_path / "pessimistic.json"
    path.write_text(json.dumps(ARTIFACT), encoding="utf-8")
    with pytest.raises(
        PersonaError, match=r"--pairs_path: .* is a trait artifact .*persona generate --trait"
    ):
        read_pair_records(path)


def test_pairs_given_as_a_trait_artifact_point_at_extract(tmp_path):
    path = write_jsonl(tmp_path / "gloomy.jsonl", [PAIR])
    with pytest.raises(PersonaError, match=r"--trait: .* is a contrastive pairs file\. Fix: .*--pairs_path"):
        load_trait(path)


def test_every_pair_format_reads_as_pairs(tmp_path):
    assert read_pair_records(write_jsonl(tmp_path / "p.jsonl", [PAIR])) == [PAIR]
    assert len(read_pair_records(write_jsonl(tmp_path / "i.jsonl", [ITEM]))) == 2
    statements = read_pair_records(write_jsonl(tmp_path / "s.jsonl", [STATEMENT]))
    assert statements[0]["positive"] == "Yes" and statements[0]["negative"] == "No"


def test_one_file_carries_both_question_sets(tmp_path):
    path = tmp_path / "gloomy.json"
    path.write_text(json.dumps({**ARTIFACT, "eval_questions": ["Held out?"]}), encoding="utf-8")
    assert load_trait(path, "extract").questions == tuple(ARTIFACT["questions"])
    assert load_trait(path, "eval").questions == ("Held out?",)
    path.write_text(json.dumps({**ARTIFACT, "eval_questions": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="'eval_questions' must be a non-empty list"):
        load_trait(path, "eval")
