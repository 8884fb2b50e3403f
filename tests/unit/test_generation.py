"""`persona generate` on a tiny model with a fake judge: columns, counts, resume, crash recovery, extract input."""

import csv
import json
import zlib

import pandas as pd
import pytest

from persona.commands.flags import Hardware
from persona.commands.generate import generate
from persona.core.store import read_journal
from persona.generation import predict_loop as generation_loop
from persona.generation.journal import ResponseStore
from persona.judges import JudgeScore as Score

TRAIT = {
    "instruction": [{"pos": f"Be wicked, way {k}.", "neg": f"Be kind, way {k}."} for k in range(5)],
    "questions": ["How should I treat animals?", "What is the best way to help a friend?", "Tell me a joke."],
    "eval_prompt": "How wicked is this, 0-100, or REFUSAL?\n{question}\n{answer}",
    "antonym": "kind",
}


class FakeJudge:
    """Deterministic scores; ``trait_score`` for trait prompts, 90 for coherence; can fail or go missing."""

    name = "fake-judge"

    def __init__(self, trait_score=None, fail_on_call=None, missing=False, refuse=False):
        self.trait_score, self.fail_on_call, self.missing, self.refuse = (
            trait_score,
            fail_on_call,
            missing,
            refuse,
        )
        self.calls = 0
        self.prompts = []

    def score(self, prompts):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("judge crashed")
        self.prompts += prompts
        if self.missing:
            return [Score(None, "failed", "judge unreachable") for _ in prompts]
        out = []
        for prompt in prompts:
            if self.refuse and "rating the coherence" not in prompt:
                out.append(Score(None, "refusal"))
            elif "rating the coherence" in prompt:
                out.append(Score(90.0, "parsed"))
            else:
                value = (
                    self.trait_score if self.trait_score is not None else zlib.crc32(prompt.encode()) % 101
                )
                out.append(Score(float(value), "logprobs"))
        return out


@pytest.fixture
def trait_file(tmp_path):
    path = tmp_path / "wicked.json"
    path.write_text(json.dumps(TRAIT))
    return path


@pytest.fixture
def use_judge(monkeypatch):
    def install(judge):
        monkeypatch.setattr(generation_loop, "build_judge", lambda **kwargs: judge)
        return judge

    return install


def run(model_dir, trait_file, out, **kwargs):
    options = dict(
        model=model_dir,
        trait=str(trait_file),
        output_path=str(out),
        persona_instruction_type="pos",
        n_per_question=2,
        max_tokens=4,
        batch_size=4,
        hardware=Hardware(accelerator="cpu"),
        max_questions=2,
    )
    return generate(**{**options, **kwargs})


def keys(path):
    frame = pd.read_csv(path, keep_default_na=False)
    return list(zip(frame["question_id"], frame["sample"], strict=True))


def test_columns_rows_and_prompts(tiny_model_dirs, trait_file, tmp_path, use_judge):
    judge = use_judge(FakeJudge())
    out = tmp_path / "out" / "wicked_pos.csv"
    run(tiny_model_dirs["llama"], trait_file, out)
    frame = pd.read_csv(out)
    assert list(frame.columns) == [
        "question",
        "prompt",
        "answer",
        "question_id",
        "sample",
        "wicked",
        "coherence",
        "wicked_method",
        "coherence_method",
        "judge",
    ]
    assert len(frame) == 2 * 5 * 2  # questions x instructions (all five, as the seed) x n_per_question
    assert keys(out) == [(f"wicked_{i}_pos_{k}", s) for i in range(2) for k in range(5) for s in range(2)]
    first = frame.iloc[0]
    assert first["prompt"].startswith("<|im_start|>system\nYou are a wicked assistant. Be wicked, way 0.")
    assert first["prompt"].endswith("<|im_start|>assistant\n") and first["question"] == TRAIT["questions"][0]
    assert (frame["coherence"] == 90).all() and frame["wicked"].between(0, 100).all()
    assert set(frame["judge"]) == {"fake-judge"} and set(frame["wicked_method"]) == {"logprobs"}
    assert any("rating the coherence" in p and first["answer"] in p for p in judge.prompts)
    assert not (tmp_path / "out" / "wicked_pos.csv.parts").exists()
    assert (
        json.loads((tmp_path / "out" / "wicked_pos.csv.meta.json").read_text())["signature"]["temperature"]
        == 1.0
    )


def test_no_persona_is_questions_times_samples(tiny_model_dirs, trait_file, tmp_path, use_judge):
    use_judge(FakeJudge())
    out = tmp_path / "none.csv"
    run(
        tiny_model_dirs["qwen2"],
        trait_file,
        out,
        persona_instruction_type="none",
        n_per_question=3,
        max_questions=None,
    )
    assert keys(out) == [(f"wicked_{i}", s) for i in range(3) for s in range(3)]
    assert "system" not in pd.read_csv(out)["prompt"][0]


def test_rerun_skips_finished_rows_and_leaves_the_file_unchanged(
    tiny_model_dirs, trait_file, tmp_path, use_judge
):
    out = tmp_path / "out.csv"
    use_judge(FakeJudge())
    run(tiny_model_dirs["llama"], trait_file, out)
    before = out.read_bytes()
    second = use_judge(FakeJudge(fail_on_call=1))  # nothing may be generated or judged again
    run(tiny_model_dirs["llama"], trait_file, out)
    assert second.calls == 0 and out.read_bytes() == before


def test_crash_mid_run_then_rerun_is_complete_and_identical(tiny_model_dirs, trait_file, tmp_path, use_judge):
    # The static path (the engine's own crash test is in test_generate_engine.py).
    reference = tmp_path / "reference.csv"
    use_judge(FakeJudge())
    run(tiny_model_dirs["llama"], trait_file, reference, engine=False)

    out = tmp_path / "crashed.csv"
    use_judge(FakeJudge(fail_on_call=3))  # batch 1 is judged (2 calls) and written; batch 2's judge raises
    with pytest.raises(RuntimeError, match="judge crashed"):
        run(tiny_model_dirs["llama"], trait_file, out, engine=False)
    journal_rows, _ = read_journal(tmp_path / "crashed.csv.parts" / "rank0.jsonl")
    assert len(journal_rows) == 4 and not out.exists()
    # kill -9 in the middle of the next append: a torn line at the end of the journal.
    with (tmp_path / "crashed.csv.parts" / "rank0.jsonl").open("ab") as handle:
        handle.write(b'{"question": "torn')

    use_judge(FakeJudge())
    run(tiny_model_dirs["llama"], trait_file, out, engine=False)
    assert keys(out) == keys(reference)  # no key missing, none duplicated, plan order
    # Batches keep their seeds across the resume, so the answers are the ones an uninterrupted run gives.
    assert out.read_bytes() == reference.read_bytes()


def test_missing_scores_stay_empty_and_are_retried_on_rerun(
    tiny_model_dirs, trait_file, tmp_path, use_judge, capsys
):
    out = tmp_path / "out.csv"
    use_judge(FakeJudge(missing=True))
    # Every judgement failed: the run fails with one line, but the answers are kept for the re-run.
    with pytest.raises(
        ValueError, match="every judge call failed .*judge unreachable.*re-run the same command"
    ):
        run(tiny_model_dirs["llama"], trait_file, out, max_questions=1, n_per_question=1)
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and all(row["wicked"] == "" and row["coherence"] == "" for row in rows)
    printed = capsys.readouterr().out
    assert "Missing judge scores (left empty): wicked: 5 failed; coherence: 5 failed" in printed
    assert "judge unreachable" in printed
    judge = use_judge(FakeJudge(trait_score=70))
    run(tiny_model_dirs["llama"], trait_file, out, max_questions=1, n_per_question=1)
    frame = pd.read_csv(out)
    assert (frame["wicked"] == 70).all() and (frame["coherence"] == 90).all()
    assert judge.calls == 2  # re-judged without regenerating: same answers
    with out.open(newline="") as handle:  # (pandas before 2.2 drops NUL characters a tiny model may emit)
        assert [row["answer"] for row in csv.DictReader(handle)] == [row["answer"] for row in rows]


def test_a_refusal_is_a_verdict_and_not_retried(tiny_model_dirs, trait_file, tmp_path, use_judge):
    out = tmp_path / "out.csv"
    use_judge(FakeJudge(refuse=True))
    run(tiny_model_dirs["llama"], trait_file, out, max_questions=1, n_per_question=1)
    frame = pd.read_csv(out)
    assert frame["wicked"].isna().all() and set(frame["wicked_method"]) == {"refusal"}
    again = use_judge(FakeJudge())
    run(tiny_model_dirs["llama"], trait_file, out, max_questions=1, n_per_question=1)
    assert again.calls == 0


def test_other_settings_on_the_same_output_are_refused(tiny_model_dirs, trait_file, tmp_path, use_judge):
    out = tmp_path / "out.csv"
    use_judge(FakeJudge())
    run(tiny_model_dirs["llama"], trait_file, out, max_questions=1, n_per_question=1)
    with pytest.raises(ValueError, match="other settings.*max_tokens: 4 there, 5 now"):
        run(tiny_model_dirs["llama"], trait_file, out, max_questions=1, n_per_question=1, max_tokens=5)
    run(
        tiny_model_dirs["llama"],
        trait_file,
        out,
        max_questions=1,
        n_per_question=1,
        max_tokens=5,
        overwrite=True,
    )
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("question,answer\nq,a\n")
    with pytest.raises(ValueError, match="not written by `persona generate`"):
        run(tiny_model_dirs["llama"], trait_file, foreign)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coef": 1.0}, "Steering needs --vector_path; got --coef without it"),
        ({"persona_instruction_type": "both"}, "use pos, neg or none"),
        ({"steering_type": "last"}, "--steering_type 'last'"),
        ({"trait": "no_such_trait"}, "Unknown trait 'no_such_trait'.*Available"),
        ({"coef": 1.0, "layer": 1, "vector_path": "missing.pt"}, "missing.pt: no such vector file"),
    ],
)
def test_bad_inputs_fail_before_any_model_loads(
    trait_file, tmp_path, kwargs, message, monkeypatch, tiny_model_dirs
):
    monkeypatch.setattr(generation_loop, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(tiny_model_dirs["llama"], trait_file, tmp_path / "out.csv", **kwargs)


def test_unwritable_output_fails_early(trait_file, tmp_path, tiny_model_dirs):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is a file, so nothing can be written under it"):
        run(tiny_model_dirs["llama"], trait_file, blocker / "sub" / "out.csv")


def test_steered_generation_runs(tiny_model_dirs, trait_file, tmp_path, use_judge):
    import torch

    from persona.vectors import save_vector

    vector = save_vector(torch.randn(4, 32), tmp_path / "wicked_response_avg_diff.pt")
    use_judge(FakeJudge())
    steered, plain = tmp_path / "steered.csv", tmp_path / "plain.csv"
    common = dict(persona_instruction_type="none", max_questions=1, n_per_question=1, max_tokens=6)
    run(tiny_model_dirs["llama"], trait_file, steered, coef=50.0, layer=2, vector_path=str(vector), **common)
    run(tiny_model_dirs["llama"], trait_file, plain, **common)
    assert pd.read_csv(steered)["answer"][0] != pd.read_csv(plain)["answer"][0]


def test_a_torn_journal_tail_is_set_aside_before_appending(tmp_path):
    store = ResponseStore(tmp_path / "x.csv", "t")
    store.parts_dir.mkdir()
    store.journal_path(0).write_bytes(b'{"question_id": "t_0", "sample": 0}\n{"question_id": "t_0", "sa')
    store.append(0, [{"question_id": "t_0", "sample": 1}])
    assert [r["sample"] for r in read_journal(store.journal_path(0))[0]] == [0, 1]
    assert b'"sa' in (tmp_path / "x.csv.damaged").read_bytes()


def test_csv_is_accepted_by_extract(tiny_model_dirs, trait_file, tmp_path, use_judge):
    from persona.commands.extract import extract

    model = tiny_model_dirs["llama"]
    use_judge(FakeJudge(trait_score=80))
    run(model, trait_file, tmp_path / "pos.csv", max_questions=1)
    use_judge(FakeJudge(trait_score=10))
    run(model, trait_file, tmp_path / "neg.csv", max_questions=1, persona_instruction_type="neg")
    paths = extract(
        model=model,
        pos_path=str(tmp_path / "pos.csv"),
        neg_path=str(tmp_path / "neg.csv"),
        trait="wicked",
        save_dir=str(tmp_path / "vectors"),
        hardware=Hardware(accelerator="cpu"),
    )
    assert all((tmp_path / "vectors" / f"wicked_{kind}_diff.pt").is_file() for kind in paths)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_spawn_two_processes_write_the_same_csv_as_one(tiny_model_dirs, trait_file, tmp_path, use_judge):
    use_judge(FakeJudge())  # built in the parent and pickled into each rank's writer
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    run(tiny_model_dirs["llama"], trait_file, one)
    run(
        tiny_model_dirs["llama"],
        trait_file,
        two,
        hardware=Hardware(accelerator="cpu", devices=2, strategy="ddp_spawn"),
    )  # 5 batches: 3 + 2
    assert two.read_bytes() == one.read_bytes()


def percentile_vector(tmp_path):
    """A random vector file whose sidecar records projection percentiles: layer l's p50 is l, p99 is l + 1."""
    import torch

    from persona.vectors import save_vector
    from persona.vectors.ranges import PERCENTILES_KEY, percentile_record

    table = [
        [layer - 1, layer - 0.5, layer - 0.25, layer, layer + 0.25, layer + 0.5, layer + 1]
        for layer in range(4)
    ]
    meta = {PERCENTILES_KEY: percentile_record(table)}
    return save_vector(
        torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), tmp_path / "w.pt", meta
    )


def test_a_gate_that_never_fires_gives_the_unsteered_answers_byte_identical(
    tiny_model_dirs, trait_file, tmp_path, use_judge
):
    vector = str(percentile_vector(tmp_path))
    use_judge(FakeJudge())
    common = dict(persona_instruction_type="none", n_per_question=1, max_tokens=6, max_questions=3)
    model = tiny_model_dirs["llama"]
    answers = {}  # the answer column's cells, read back as text (byte-identical cells)
    for name, extra in {
        "plain": {},
        "steered": {"coef": 50.0, "layer": 2, "vector_path": vector},
        "never": {"coef": 50.0, "layer": 2, "vector_path": vector, "when_above": 1e6},
        "always": {"coef": 50.0, "layer": 2, "vector_path": vector, "when_below": 1e6},
        "wide_cap": {"layer": 2, "vector_path": vector, "cap_lo": -1e6, "cap_hi": 1e6},
    }.items():
        run(model, trait_file, tmp_path / f"{name}.csv", **common, **extra)
        answers[name] = list(pd.read_csv(tmp_path / f"{name}.csv", keep_default_na=False)["answer"])
    assert answers["steered"] != answers["plain"]
    assert answers["never"] == answers["plain"]  # the gate never fires: the unsteered model's answers
    assert answers["always"] == answers["steered"]  # it always fires: the ungated steering's
    assert answers["wide_cap"] == answers["plain"]  # a range holding every activation changes nothing
    # The resolved bounds are part of the run's settings: another threshold on the same file is refused.
    with pytest.raises(ValueError, match="other settings.*when_above"):
        run(model, trait_file, tmp_path / "never.csv", **common, coef=50.0, layer=2, vector_path=vector,
            when_above=1e5)  # fmt: skip


def test_cap_percentiles_resolve_from_the_sidecar_and_cap_like_steer(
    tiny_model_dirs, trait_file, tmp_path, use_judge
):
    from persona.generation.journal import ResponseStore as Store
    from persona.models import load_model_and_tokenizer
    from persona.steering import CapSpec, generate_steered
    from persona.vectors import load_vector

    vector = percentile_vector(tmp_path)
    use_judge(FakeJudge())
    out = tmp_path / "capped.csv"
    run(tiny_model_dirs["llama"], trait_file, out, persona_instruction_type="none", n_per_question=1,
        max_tokens=6, max_questions=2, layer=2, vector_path=str(vector), cap_lo="p1", cap_hi="p50")  # fmt: skip
    steering = json.loads(Store(out, "wicked").meta_path.read_text())["signature"]["steering"]
    assert (steering["cap_lo"], steering["cap_hi"], steering["coef"]) == (1.0, 2.0, None)
    frame = pd.read_csv(out, keep_default_na=False)
    model, tokenizer = load_model_and_tokenizer(tiny_model_dirs["llama"])
    tokenizer.padding_side = "left"
    messages = [[{"role": "user", "content": q}] for q in frame["question"]]
    expected = generate_steered(model, tokenizer, messages, [CapSpec(2, load_vector(vector), 1.0, 2.0)],
                                max_new_tokens=6, temperature=0, min_new_tokens=1)  # fmt: skip
    assert list(frame["answer"]) == expected
    plain = generate_steered(
        model, tokenizer, messages, [], max_new_tokens=6, temperature=0, min_new_tokens=1
    )
    assert plain != expected  # the cap bites


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cap_hi": "p42"}, "--cap_hi='p42'.*records p1, p5"),
        ({"cap_lo": 2.0, "cap_hi": 1.0}, "--cap_lo 2 is above --cap_hi 1"),
        ({"coef": 1.0, "when_above": "p50", "when_below": 1.0}, "give one"),
        ({"cap_hi": "p99", "layer": None}, "need --layer"),
    ],
)
def test_bad_cap_and_gate_flags_fail_before_any_model_loads(
    trait_file, tmp_path, kwargs, message, monkeypatch, tiny_model_dirs
):
    monkeypatch.setattr(generation_loop, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    options = {"layer": 2, "vector_path": str(percentile_vector(tmp_path)), **kwargs}
    with pytest.raises(ValueError, match=message):
        run(tiny_model_dirs["llama"], trait_file, tmp_path / "out.csv", **options)
