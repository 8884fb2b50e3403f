"""Range graders (local under steering, API) and the vector routes of the seven traits."""

import json

import pytest
import torch

from persona.education.grading import RANGE_AGGREGATION, ApiRangeGrader, LocalRangeGrader
from persona.education.settings import VectorSettings
from persona.judges import JudgeScore, LocalJudge
from persona.steering import SteeringSpec


class StubJudge:
    name = "openai:stub"

    def __init__(self, scores):
        self.scores = scores

    def score(self, prompts):
        return self.scores[: len(prompts)]


def test_api_grades_are_read_on_the_set_range_and_failures_stay_missing():
    judge = StubJudge(
        [
            JudgeScore(15.0, "logprobs"),
            JudgeScore(28.0, "logprobs"),
            JudgeScore(None, "failed", error="HTTP 503"),
            JudgeScore(None, "refusal"),
        ]
    )
    grades = ApiRangeGrader("api:stub", judge).grade(["a", "b", "c", "d"], [(0, 3), (0, 2), (0, 3), (0, 3)])
    assert (grades[0].expected, grades[0].score) == (1.5, 2)
    assert (grades[1].expected, grades[1].score) == (2.0, 2)  # 2.8 on a 0-2 set: clipped to its maximum
    assert grades[2].failed and grades[2].expected is None and grades[2].error == "HTTP 503"
    assert grades[3].method == "refusal" and grades[3].score is None


def test_a_steered_local_grader_reads_a_different_distribution(tiny_llama, tokenizer):
    judge = LocalJudge((tiny_llama, tokenizer), aggregation=RANGE_AGGREGATION, batch_size=2)
    prompts, ranges = ["Score this answer from 0 to 3: the dog", "Score from 0 to 2: cats"], [(0, 3), (0, 2)]
    plain = LocalRangeGrader("unsteered", judge, [], min_mass=0.0).grade(prompts, ranges)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    spec = SteeringSpec(layer=2, vector=direction, coef=8.0, positions="all")
    steered = LocalRangeGrader("x+", judge, [spec], min_mass=0.0).grade(prompts, ranges)
    zero = LocalRangeGrader("x0", judge, [SteeringSpec(2, direction, 0.0, positions="all")], 0.0).grade(
        prompts, ranges
    )
    assert all(g.expected is not None and 0 <= g.expected <= r[1] for g, r in zip(plain, ranges, strict=True))
    assert [g.expected for g in zero] == [g.expected for g in plain]
    assert all(abs(a.expected - b.expected) > 1e-6 for a, b in zip(plain, steered, strict=True))
    for grade, prompt, (low, high) in zip(plain, prompts, ranges, strict=True):  # mass = P(allowed scores)
        alone = judge.answer_distributions([prompt])[0]
        assert grade.mass == pytest.approx(sum(alone[str(k)] for k in range(low, high + 1)), rel=1e-4)


def test_vector_routes(tmp_path, monkeypatch):
    from persona.education import trait_vectors
    from persona.vectors import save_vector, vector_filename

    settings = VectorSettings()
    assert trait_vectors.choose_route("evil", settings) == "pairs"  # hand-written pairs
    assert trait_vectors.choose_route("optimistic", settings) == "generated"
    save_vector(torch.zeros(4, 8), tmp_path / vector_filename("optimistic", "response_avg"), {})
    assert trait_vectors.choose_route("optimistic", VectorSettings(vector_dir=str(tmp_path))) == "given"
    assert (
        trait_vectors.choose_route("impolite", VectorSettings(route="instruction_pairs"))
        == "instruction_pairs"
    )
    with pytest.raises(ValueError, match="vectors.route=pairs but .*impolite.jsonl does not exist"):
        trait_vectors.choose_route("impolite", VectorSettings(route="pairs"))
    with pytest.raises(ValueError, match="vectors.route='nope'"):
        VectorSettings(route="nope")


def test_instruction_pairs_fallback_writes_cached_pairs(tiny_llama, tokenizer, tmp_path):
    from persona.education.trait_vectors import instruction_pairs

    settings = VectorSettings(route="instruction_pairs", max_questions=2, max_tokens=4)
    path = instruction_pairs("impolite", settings, tmp_path, lambda: (tiny_llama, tokenizer), seed=0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 and all(
        r["positive"] and r["negative"] and r["split"] == "train" for r in records
    )
    assert (
        "system" not in path.read_text()
    )  # the pair keeps the question only; the persona shaped the answers
    before = path.stat().st_mtime_ns
    assert instruction_pairs("impolite", settings, tmp_path, None, seed=0) == path  # cached: no model needed
    assert path.stat().st_mtime_ns == before
