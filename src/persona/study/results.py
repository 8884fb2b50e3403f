"""The one reader of a study's ``results.json``, for `persona report` and `persona report compare`.

Both read the same nested record; each used to index it directly, so a file from another version or edited by
hand gave ``KeyError: 'traits'`` or ``'list' object has no attribute 'items'``. :func:`read_results` checks every
key and type the report and the comparison read (extra keys are allowed) and names the first one that is wrong.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from persona.core.errors import PersonaError
from persona.core.store import read_json


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelInfo(Record):
    model: str
    layers: int
    hidden: int
    answer: str
    device: str = "cpu"


class LayerResult(Record):
    recommended: int
    auc: float
    separation: float
    csv: str
    png: str


class SweepResult(Record):
    layer: int
    monotone: bool
    effect: float
    csv: str
    png: str
    table: list[dict]


class JudgedSweep(Record):
    layer: int
    csv: str
    png: str
    table: list[dict]
    effect: float | None = None


class GeneratedRoute(Record):
    rows_per_side: int
    filter: str
    cosine_with_pairs_vector: float | None = None  # only when the trait also has contrastive pairs
    pos_csv: str
    neg_csv: str
    pos_trait_mean: float | None
    neg_trait_mean: float | None
    pos_coherence_mean: float | None
    neg_coherence_mean: float | None


class TraitResult(Record):
    vectors: dict[str, str] | None = None  # none when every source of vectors missed
    inputs: dict[str, str] = {}
    layers: LayerResult | None = None
    sweep: SweepResult | None = None
    judged_sweep: JudgedSweep | None = None
    generated: GeneratedRoute | None = None


class Correlation(Record):
    r: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None


class FinetuneResult(Record):
    runs: list[str]
    correlation: Correlation
    screen_auc: float | None = None
    monitor_csv: str
    monitor_png: str
    tensorboard: str
    shift_csv: str
    shift_png: str
    screen_summary: str
    representation: dict | None = None


class GenerationsResult(Record):
    layer: int
    csv: str


class ExportResult(Record):
    gguf: str
    layer: int | None = None


class StudyResults(Record):
    title: str = "persona study"
    model: ModelInfo
    trait: str
    traits: dict[str, TraitResult]
    timings: dict[str, float]
    devices: dict[str, str] = {}
    matmul_gflops: float | None = None
    peak_memory_gib: float | None = None
    not_run: list[str] = []
    generations: GenerationsResult | None = None
    finetune: FinetuneResult | None = None
    export: ExportResult | None = None
    personality_arm: dict | None = None
    missed: dict[str, str] = {}
    main_trait_note: str | None = None

    @model_validator(mode="after")
    def main_trait_is_listed(self) -> StudyResults:
        if self.trait not in self.traits:
            raise ValueError(f"trait {self.trait!r} is not among traits {sorted(self.traits)}")
        return self


def read_results(run: Path) -> dict:
    """``run/results.json`` as written by `persona study`, checked; a :class:`PersonaError` names the first bad field."""
    path = run / "results.json"
    if not path.is_file():
        raise PersonaError(
            f"{path} not found. Fix: run `persona study` (or `persona demo`) with --run_dir {run} first."
        )
    results = read_json(path, what="study results file")
    try:
        StudyResults.model_validate(results)
    except ValidationError as error:
        raise PersonaError(f"{path}: incomplete or from another version ({_first_problem(error)}). "
                           f"Fix: re-run the study with --run_dir {run} (finished phases are reused).") from None  # fmt: skip
    return results


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    field = ".".join(str(part) for part in problem["loc"]) or "the top level"
    if problem["type"] == "missing":
        return f"no {field}"
    return f"{field}: {problem['msg'].lower()}, got {problem.get('input')!r:.40}"
