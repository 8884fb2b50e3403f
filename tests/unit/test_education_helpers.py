"""The pieces run_study and build_vector are made of: the run directory guard, and each vector route's
provenance and the calls it makes (persona generate / extract faked, so no model loads)."""

import pandas as pd
import pytest

from persona.education.settings import VectorSettings


def test_a_run_directory_is_deleted_only_when_it_is_a_study_run(tmp_path):
    from persona.education.cli import prepare_run_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a study run directory \\(no meta.json\\); not deleting it"):
        prepare_run_dir(foreign, overwrite=True)
    with pytest.raises(ValueError, match="exists and is not a study run directory"):
        prepare_run_dir(foreign, overwrite=False)
    assert (foreign / "notes.txt").is_file()

    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text("{}")
    prepare_run_dir(run, overwrite=False)  # a run to resume: kept
    assert (run / "meta.json").is_file()
    (run / "my_notes.md").write_text("mine")  # issue 20.4's class: --overwrite deleted the user's files too
    (run / "vector_evil").mkdir()
    with pytest.raises(ValueError, match=r"holds my_notes\.md, which the study did not write; not deleting"):
        prepare_run_dir(run, overwrite=True)
    assert (run / "my_notes.md").read_text() == "mine"
    (run / "my_notes.md").unlink()
    prepare_run_dir(run, overwrite=True)
    assert not run.exists()
    prepare_run_dir(tmp_path / "new", overwrite=False)  # nothing there yet: fine


@pytest.fixture
def fake_commands(monkeypatch):
    """persona generate writes judged CSVs with the given pos/neg scores; extract records its arguments."""
    from persona.commands import extract as extract_module
    from persona.commands import generate as generate_module

    calls = {"generate": [], "extract": [], "scores": {"pos": [90, 90], "neg": [10, 10]}}

    def generate(**kwargs):
        calls["generate"].append(kwargs)
        scores = calls["scores"][kwargs["persona_instruction_type"]]
        frame = pd.DataFrame({kwargs["trait"]: scores, "coherence": [80] * len(scores)})
        frame.to_csv(kwargs["output_path"], index=False)

    def extract(**kwargs):
        calls["extract"].append(kwargs)
        return {"response_avg": f"{kwargs['save_dir']}/{kwargs['trait']}_response_avg_diff.pt"}

    monkeypatch.setattr(generate_module, "generate", generate)
    monkeypatch.setattr(extract_module, "extract", extract)
    return calls


def build(route, tmp_path, settings=VectorSettings(), trait="optimistic", model_and_tokenizer=None):
    from persona.education.trait_vectors import build_vector

    return build_vector(
        trait,
        route,
        settings,
        tmp_path,
        model="m",
        model_and_tokenizer=model_and_tokenizer,
        seed=7,
        dtype="float32",
        accelerator="cpu",
    )


def test_the_generated_route_filters_pairs_and_falls_back_to_all_of_them(fake_commands, tmp_path):
    made = build("generated", tmp_path, VectorSettings(threshold=60, judge="local"))
    assert made == {
        "trait": "optimistic",
        "route": "generated",
        "path": f"{tmp_path}/optimistic_response_avg_diff.pt",
        "detail": "persona-prompted answers judged by local: 2 of 2 pairs passed the threshold 60",
        "pairs_kept": 2,
        "pairs_total": 2,
        "filtered": True,
    }
    assert [g["persona_instruction_type"] for g in fake_commands["generate"]] == ["pos", "neg"]
    assert all(
        g["model"] == "m" and g["seed"] == 7 and g["judge_model"] == "local"
        for g in fake_commands["generate"]
    )
    (call,) = fake_commands["extract"]
    assert call["pos_path"].endswith("optimistic_pos.csv") and call["neg_path"].endswith("optimistic_neg.csv")
    assert call["no_filter"] is False and call["overwrite"] is True and call["hardware"].accelerator == "cpu"

    fake_commands["scores"]["pos"] = [10, 10]  # no pair passes: every pair is used, and the detail says so
    made = build("generated", tmp_path)
    assert made["filtered"] is False and made["pairs_kept"] == 0
    assert made["detail"].endswith("; none did, so ALL pairs were used (unfiltered)")
    assert fake_commands["extract"][-1]["no_filter"] is True


def test_the_pairs_given_and_instruction_routes(fake_commands, tmp_path, monkeypatch):
    from persona.education import trait_vectors

    made = build("pairs", tmp_path, trait="evil")
    assert made["detail"] == "hand-written pairs evil.jsonl (train split)" and list(made) == [
        "trait",
        "route",
        "path",
        "detail",
    ]
    assert fake_commands["extract"][-1]["split"] == "train"
    assert fake_commands["extract"][-1]["pairs_path"].endswith("pairs/evil.jsonl")

    given = build("given", tmp_path, VectorSettings(vector_dir=str(tmp_path)), trait="evil")
    assert given["path"] == str(tmp_path / "evil_response_avg_diff.pt")
    assert given["detail"] == f"ready vector file in {tmp_path}"
    assert len(fake_commands["extract"]) == 1  # a ready file is not extracted again

    pairs = tmp_path / "impolite_instruction_pairs.jsonl"
    monkeypatch.setattr(trait_vectors, "instruction_pairs", lambda *args: pairs)
    made = build("instruction_pairs", tmp_path, trait="impolite")
    assert made["detail"] == (
        "fallback: pos/neg-instruction answers by the model itself, unjudged (impolite_instruction_pairs.jsonl)"
    )
    assert (
        fake_commands["extract"][-1]["pairs_path"] == str(pairs)
        and "split" not in fake_commands["extract"][-1]
    )
    with pytest.raises(ValueError, match="route 'auto' is not buildable"):
        build("auto", tmp_path)


def test_compare_tolerates_runs_without_grades():
    """A run stopped before grading has no QWK column; the comparison says "(none)" instead of a KeyError."""
    import pandas as pd

    from persona.education.compare import by_run

    empty = by_run(pd.DataFrame({"run": [], "grader": []}), "grader", "qwk", ["a", "b"])
    assert empty.empty and list(empty.columns) == ["a", "b"]
    table = pd.DataFrame({"run": ["a", "b"], "grader": ["unsteered", "unsteered"], "qwk": [0.5, 0.7]})
    assert by_run(table, "grader", "qwk", ["b", "a"]).loc["unsteered"].tolist() == [0.7, 0.5]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            '{"model": 3, "sets_path": "s.json"}',
            r"settings\.json: field 'model' is 3, not a str\. Fix: re-run",
        ),
        ('{"model": "m"}', r"settings\.json: field 'sets_path' is None, not a str"),
        ("[1]", r"settings\.json: expected a JSON object, found list"),
        ('{"model": "m"', r"settings\.json: not valid JSON"),
    ],
)
def test_report_and_compare_read_settings_json_through_one_checked_reader(tmp_path, settings, message):
    """Issue 20.5's class in the education study: settings["model"] was a KeyError (or a TypeError) traceback."""
    from persona.education.report import load_results

    (tmp_path / "settings.json").write_text(settings)
    with pytest.raises(ValueError, match=message):
        load_results(tmp_path)
