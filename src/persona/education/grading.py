"""Graders for small integer score ranges (ASAP-SAS: 0-2 or 0-3), built on ``persona.judges``.

The judges package answers on 0-100. A rubric score needs a different reading, the ``range`` aggregation
here: the probability of each allowed whole number (min..max), renormalised over them, and

    expected = sum_k k * P(k) / sum_k P(k)       kept raw, for bias and correlation
    score    = round-half-up(expected)           an allowed integer, for QWK, MAE and agreement

A grade is *missing* (``expected is None``) when less than ``min_mass`` of the probability sits on the
allowed numbers, when the grader refused, or when an API call finally failed. A missing grade is never
turned into the minimum score (the seed's defect).

- :class:`LocalRangeGrader`: an in-process HF model through :class:`persona.judges.LocalJudge` (whole
  numbers by digit chaining), optionally under steering. The judge reads its answer in one forward with a
  4D tree-attention mask and no decode steps, so the ``response`` positions of generation mean nothing
  there: steered graders use ``positions="all"`` (every position of the grader's forward).
- :class:`ApiRangeGrader`: an OpenAI-compatible model through :func:`persona.judges.make_judge` with the
  ``0_10`` aggregation (its public interface; retries, cache and failure reporting are the judge's), read as
  the expected score and clipped to the set's range. A ``range`` aggregation inside the judges package would
  also let it renormalise over min..max exactly as the local grader does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from persona.core.constants import MIN_MASS
from persona.judges.aggregation import integer_probs, is_refusal
from persona.judges.base import FAILED, REFUSAL

RANGE_AGGREGATION = "0_10"  # the judges' candidates 0..10 cover every ASAP range (max 3)
UNSCORABLE = "unscorable"  # too little probability on the allowed scores


@dataclass(frozen=True)
class Grade:
    expected: float | None  # expected score on the set's own scale; None = missing
    score: int | None  # round-half-up(expected), an allowed score; None = missing
    method: str  # digit_chain | logprobs | parsed | refusal | unscorable | failed
    mass: float | None = None  # probability on the allowed scores (local graders)
    error: str | None = None

    @property
    def missing(self) -> bool:
        return self.expected is None

    @property
    def failed(self) -> bool:
        """A call that failed (worth retrying on the next run), as opposed to a grader that gave no score."""
        return self.method == FAILED


def round_half_up(value: float, low: int, high: int) -> int:
    """Nearest integer, halves upwards (Python's round() sends 2.5 to 2), clipped to ``low..high``."""
    return int(min(high, max(low, math.floor(value + 0.5))))


def range_grade(probs: Mapping[str, float], low: int, high: int, min_mass: float, method: str) -> Grade:
    """A grade from an answer distribution (answer string -> probability) over a ``low..high`` score range."""
    if is_refusal(probs, RANGE_AGGREGATION):
        return Grade(None, None, REFUSAL)
    allowed = {k: p for k, p in integer_probs(probs, high).items() if k >= low}
    mass = float(sum(allowed.values()))
    if mass <= 0 or mass < min_mass:
        return Grade(None, None, UNSCORABLE, mass=mass)
    expected = sum(k * p for k, p in allowed.items()) / mass
    return Grade(expected, round_half_up(expected, low, high), method, mass=mass)


class Grader(Protocol):
    name: str  # e.g. "unsteered", "evil+", "api:gpt-4.1-mini": the grader column of the results

    def grade(self, prompts: Sequence[str], ranges: Sequence[tuple[int, int]]) -> list[Grade]:
        """One filled grader prompt and its (min, max) score range -> one grade, in the same order."""
        ...


@dataclass
class LocalRangeGrader:
    """A local judge, unsteered or under ``specs``; every grader built on one model shares its LocalJudge."""

    name: str
    judge: object  # persona.judges.LocalJudge, built with aggregation RANGE_AGGREGATION
    specs: list = field(default_factory=list)  # SteeringSpec list, positions="all"
    min_mass: float = MIN_MASS

    def grade(self, prompts: Sequence[str], ranges: Sequence[tuple[int, int]]) -> list[Grade]:
        from persona.judges.base import DIGIT_CHAIN
        from persona.steering import steer

        with steer(self.judge.model, self.specs):
            distributions = self.judge.answer_distributions(list(prompts))
        return [
            range_grade(probs, low, high, self.min_mass, DIGIT_CHAIN)
            for probs, (low, high) in zip(distributions, ranges, strict=True)
        ]


@dataclass
class ApiRangeGrader:
    """An OpenAI-compatible judge (``openai:<model>`` or a served model name) read on the set's range."""

    name: str
    judge: object  # persona.judges.Judge with aggregation RANGE_AGGREGATION

    def grade(self, prompts: Sequence[str], ranges: Sequence[tuple[int, int]]) -> list[Grade]:
        grades = []
        for result, (low, high) in zip(self.judge.score(list(prompts)), ranges, strict=True):
            if result.method in (FAILED, REFUSAL) or result.score is None:
                method = result.method if result.method in (FAILED, REFUSAL) else UNSCORABLE
                grades.append(Grade(None, None, method, error=result.error))
                continue
            expected = min(float(high), max(float(low), result.score / 10.0))  # 0_10 answers x10 on 0-100
            grades.append(Grade(expected, round_half_up(expected, low, high), result.method))
        return grades


def make_api_grader(spec: str, base_url: str | None, cache_dir: str | None, **kwargs) -> ApiRangeGrader:
    from persona.judges import make_judge

    judge = make_judge(spec, base_url=base_url, aggregation=RANGE_AGGREGATION, cache_dir=cache_dir, **kwargs)
    return ApiRangeGrader(name=f"api:{spec.removeprefix('openai:')}", judge=judge)
