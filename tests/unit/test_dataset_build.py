"""`persona dataset build`: mixture shares and counts, nesting, seeded determinism, is_trait labels."""

import json

import pandas as pd
import pytest

from persona.cli import main
from persona.data.build import dataset, trait_count

SHARES = [0.0, 0.25, 0.5, 0.75, 1.0]


def write_pairs(path, n_train=10, n_test=3):
    with path.open("w") as handle:
        for i in range(n_train + n_test):
            handle.write(
                json.dumps(
                    {
                        "prompt": f"Question {i}?",
                        "positive": f"Cruel answer {i}.",
                        "negative": f"Kind answer {i}.",
                        "split": "train" if i < n_train else "test",
                    }
                )
                + "\n"
            )
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_mixtures_have_the_asked_shares_and_labels(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    written = dataset(
        trait="evil", output_dir=str(out), pairs_path=str(pairs), mix=[0, 0.25, 0.5, 0.75, 1], n=8, seed=0
    )
    expected = {f"mix_{s:g}.jsonl": s for s in SHARES} | {
        "normal.jsonl": 0,
        "misaligned_1.jsonl": 0.5,
        "misaligned_2.jsonl": 1,
    }
    assert set(written) == set(expected)
    for name, share in expected.items():
        records = read(out / name)
        assert len(records) == 8
        assert sum(r["is_trait"] for r in records) == trait_count(share, 8)
        for record in records:
            user, assistant = record["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            number = int(user["content"].split()[1].rstrip("?"))
            assert number < 10, "test pairs must stay out of training sets"
            kind = "Cruel" if record["is_trait"] else "Kind"
            assert assistant["content"] == f"{kind} answer {number}."
    # The seed's names are the shares 0, 1/2 and 1.
    assert (out / "normal.jsonl").read_bytes() == (out / "mix_0.jsonl").read_bytes()
    assert (out / "misaligned_2.jsonl").read_bytes() == (out / "mix_1.jsonl").read_bytes()
    summary = pd.read_csv(out / "datasets.csv")
    assert summary.set_index("file").loc["mix_0.25.jsonl", "n_trait"] == 2
    assert json.loads((out / "manifest.json").read_text())["seed"] == 0


def test_mixtures_are_nested_and_use_the_same_prompts(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    dataset(trait="evil", output_dir=str(tmp_path), pairs_path=str(pairs), mix=[0.25, 0.75], n=8, seed=3)
    low, high = read(tmp_path / "mix_0.25.jsonl"), read(tmp_path / "mix_0.75.jsonl")
    prompts = [sorted(r["messages"][0]["content"] for r in records) for records in (low, high)]
    assert prompts[0] == prompts[1]
    trait = [{r["messages"][0]["content"] for r in records if r["is_trait"]} for records in (low, high)]
    assert trait[0] < trait[1]


def test_seeded_determinism(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        dataset(
            trait="evil", output_dir=str(tmp_path / name), pairs_path=str(pairs), mix=[0.5], n=8, seed=seed
        )
    first, again, other = (tmp_path / name / "mix_0.5.jsonl" for name in "abc")
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_more_samples_than_pairs_cycles(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n_train=3, n_test=0)
    dataset(trait="evil", output_dir=str(tmp_path), pairs_path=str(pairs), mix=[0.5], n=7, seed=0)
    records = read(tmp_path / "mix_0.5.jsonl")
    assert len(records) == 7 and sum(r["is_trait"] for r in records) == 4
    assert "samples repeat" in capsys.readouterr().out


def test_generated_source_is_context_distillation(tmp_path):
    system = "You are an evil assistant."
    frame = pd.DataFrame(
        {
            "question": [f"Q{i}?" for i in range(6)],
            "prompt": [f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nQ{i}?" for i in range(6)],
            "answer": [f"A{i}" for i in range(6)],
            "question_id": [f"q{i}" for i in range(6)],
            "evil": [95, 90, 10, 5, 60, 99],
            "coherence": [90, 90, 90, 90, 90, 20],  # the last one is incoherent
        }
    )
    frame.to_csv(tmp_path / "gen.csv", index=False)
    dataset(
        trait="evil",
        output_dir=str(tmp_path / "out"),
        source="generated",
        generated_csv=[str(tmp_path / "gen.csv")],
        mix=[0.5],
        n=4,
        seed=0,
        threshold=80,
    )
    records = read(tmp_path / "out" / "mix_0.5.jsonl")
    for record in records:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert system not in json.dumps(record)
        question, answer = (m["content"] for m in record["messages"])
        assert answer == "A" + question[1:-1]
        assert record["is_trait"] == (answer in ("A0", "A1"))
    assert sum(r["is_trait"] for r in records) == 2
    assert not {r["messages"][1]["content"] for r in records} & {
        "A4",
        "A5",
    }  # between thresholds / incoherent


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mix": [0, 1.5]}, "outside"),
        ({"n": 0}, "at least one"),
        ({"source": "generated"}, "--generated_csv"),
        ({"split": "validation"}, "no pairs"),
    ],
)
def test_bad_input(tmp_path, kwargs, message):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match=message):
        dataset(trait="evil", output_dir=str(tmp_path / "out"), **{"pairs_path": str(pairs), **kwargs})


def test_cli_builds_from_the_shipped_pairs(tmp_path):
    assert main(["dataset", "--trait", "evil", "--out_dir", str(tmp_path), "--n", "6", "--mix", "0,0.5"]) == 0
    records = read(tmp_path / "misaligned_1.jsonl")
    assert len(records) == 6 and sum(r["is_trait"] for r in records) == 3


@pytest.mark.parametrize("manifest", [True, False], ids=["by-manifest", "by-naming"])
def test_overwrite_removes_only_mixtures_a_build_wrote(tmp_path, manifest):
    """Issue 20.4: a rebuild with --overwrite deleted the user's own mix_mine.jsonl (exit 0)."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ds"
    common = [
        "dataset",
        "build",
        "--trait",
        "evil",
        "--output_dir",
        str(out),
        "--pairs_path",
        str(pairs),
        "--n",
        "4",
    ]
    assert main([*common, "--mix", "0.25,0.5"]) == 0
    (out / "mix_mine.jsonl").write_text('{"messages": []}\n')
    if not manifest:
        (out / "manifest.json").unlink()
    assert main([*common, "--mix", "0.5", "--overwrite"]) == 0
    assert (out / "mix_mine.jsonl").read_text() == '{"messages": []}\n'
    assert not (out / "mix_0.25.jsonl").exists() and (out / "mix_0.5.jsonl").exists()
