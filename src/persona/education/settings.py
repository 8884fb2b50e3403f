"""The study's settings: small frozen dataclasses, one per concern; jsonargparse turns them into nested flags
(``--students.n_samples 3``) and YAML sections (``students: {n_samples: 3}``).

``--test`` shrinks a plan to a smoke run (:func:`test_plan`); sizes it leaves alone stay as given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SEED_TRAITS = ("evil", "apathetic", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic")
ROUTES = ("auto", "given", "pairs", "generated", "instruction_pairs")
HUMAN_REFERENCES = ("score1", "mean")

TEST_TRAITS = (
    "evil",
    "optimistic",
)  # one trait with hand-written pairs, one through persona.generation.journal
TEST_SETS = (1, 3)  # one 0-3 set, one 0-2 set
TEST_MIN_MASS = 0.01  # SmolLM2-135M puts only ~5-15% of its first-token mass on the digits it is asked for


@dataclass(frozen=True)
class StudentSettings:
    n_samples: int = 10
    """Answers per (student type, set) in experiment A."""
    max_new_tokens: int = 160
    """Length limit of a student's answer."""
    temperature: float = 1.0
    """Sampling temperature of the students (0 = greedy)."""
    batch_size: int = 8
    """Answers generated per batch (also the unit of resumption and of seeding)."""

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("students.n_samples, max_new_tokens and batch_size must be at least 1.")
        if self.temperature < 0:
            raise ValueError(f"students.temperature={self.temperature}: must be >= 0 (0 = greedy).")


@dataclass(frozen=True)
class GraderSettings:
    n_real: int = 10
    """Real answers sampled per set (seeded) for experiment B."""
    api: str | None = None
    """An API grader as well, e.g. openai:gpt-4.1-mini or a model on an OpenAI-compatible server."""
    api_base_url: str | None = None
    """Base URL of the API grader's server (default $OPENAI_BASE_URL, then OpenAI); key from $OPENAI_API_KEY."""
    batch_size: int = 8
    """Grader prompts per forward of the local grader."""
    min_mass: float | None = None
    """Least probability on the allowed scores for a grade to count (else missing); default 0.25 (the seed's), or
    0.01 with --test."""
    include_source: bool = True
    """Put the reading passage / procedure into the grader prompt."""
    cross_grade: bool = False
    """Grade experiment A's answers with every steered grader too (full student x grader heat-map)."""
    human_reference: str = "score1"
    """Human score to compare with: score1 (the official score) or mean (of both raters)."""

    def __post_init__(self) -> None:
        if self.n_real < 1 or self.batch_size < 1:
            raise ValueError("graders.n_real and graders.batch_size must be at least 1.")
        if self.min_mass is not None and not 0 <= self.min_mass <= 1:
            raise ValueError(f"graders.min_mass={self.min_mass}: must be within 0..1.")
        if self.human_reference not in HUMAN_REFERENCES:
            raise ValueError(f"graders.human_reference={self.human_reference!r}. Fix: use score1 or mean.")


@dataclass(frozen=True)
class SteeringSettings:
    layer: int | None = None
    """Steering layer (0 = embeddings, L = output of block L-1); default the middle layer."""
    coef: float = 2.0
    """Steering strength of the students (+coef and -coef per trait), raw multiplier of the vector."""
    relative: bool = False
    """Read coef (and grader_coef) as a fraction of the mean residual norm at the layer instead of a raw multiplier."""
    grader_coef: float | None = None
    """Strength for steered graders (every position of the grader's forward); default coef."""


@dataclass(frozen=True)
class VectorSettings:
    route: str = "auto"
    """auto, given, pairs, generated or instruction_pairs (see persona.education.trait_vectors)."""
    vector_dir: str | None = None
    """Folder of ready vector files <trait>_response_avg_diff.pt to use as they are (route given)."""
    max_questions: int = 5
    """Extract questions per trait for the generated / instruction_pairs routes."""
    n_per_question: int = 1
    """Answers per (question, instruction) for the generated route (1 = greedy, as the seed)."""
    max_tokens: int = 96
    """New tokens per persona-prompted answer."""
    threshold: float = 50.0
    """Generated route: keep pairs with pos >= threshold and neg < 100 - threshold (both coherence >= 50)."""
    judge: str = "local"
    """Judge of the generated route's answers (local, or an OpenAI-compatible model)."""

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"vectors.route={self.route!r}. Fix: use one of {', '.join(ROUTES)}.")
        if self.max_questions < 1 or self.n_per_question < 1 or self.max_tokens < 1:
            raise ValueError("vectors.max_questions, n_per_question and max_tokens must be at least 1.")


def test_plan(
    traits: list[str] | None,
    sets: list[int] | None,
    students: StudentSettings,
    graders: GraderSettings,
    vectors: VectorSettings,
):
    """--test: 2 traits x 2 sets x 1 sample, 3 real answers per set, short answers, every grader on A.

    Grader prompts leave out the reading passage (it triples their length, and a grader's forward costs in
    proportion); the generated vector route answers one question per instruction.
    """
    traits = list(traits or TEST_TRAITS)[:2]
    sets = list(sets or TEST_SETS)[:2]
    students = dataclasses.replace(students, n_samples=1, max_new_tokens=min(students.max_new_tokens, 40))
    graders = dataclasses.replace(
        graders,
        n_real=min(graders.n_real, 3),
        cross_grade=True,
        include_source=False,
        min_mass=TEST_MIN_MASS if graders.min_mass is None else graders.min_mass,
    )
    vectors = dataclasses.replace(vectors, max_questions=1, max_tokens=min(vectors.max_tokens, 32))
    return traits, sets, students, graders, vectors
