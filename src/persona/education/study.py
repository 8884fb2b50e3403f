"""The ASAP-SAS study: experiment A (steered students) and experiment B (steered graders).

Phases, in order; each resumes where a killed run stopped:

1. ``model``: layer count, steering layer (default the middle one) and the mean residual norm there.
2. ``vector_<trait>``: one persona vector per trait (route per :mod:`persona.education.trait_vectors`).
3. A, answers: every student type (unsteered; each trait at +coef and -coef, ``response`` steering) answers
   every set's question ``n_samples`` times -> ``answers.jsonl`` keyed by (type, set, sample).
4. A, grades: the unsteered local grader (and the API grader, and with ``cross_grade`` every steered
   grader) scores every answer -> ``grades.jsonl`` keyed by (experiment, type, grader, set, sample).
5. B, grades: ``n_real`` real answers per set (seeded) scored by every grader type -> ``grades.jsonl``.

Generation is seeded per fixed batch from its keys (torch, numpy and random), so a resumed batch samples as
the first time did. A grade whose call failed is retried once in the run, then logged to ``failures.jsonl``
and left out of ``grades.jsonl`` (the next run retries it); a grader that answers but not with an allowed
score is stored with ``expected = null`` and reported as missing. Neither becomes the minimum score.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from persona.core.constants import MIN_MASS
from persona.core.store import KeyedJournal, batch_seed, write_csv, write_json
from persona.data.chat import render_chat
from persona.education.data import SetConfig
from persona.education.grading import (
    RANGE_AGGREGATION,
    Grade,
    Grader,
    LocalRangeGrader,
    make_api_grader,
)
from persona.education.prompts import grader_prompt, student_messages
from persona.education.settings import GraderSettings, SteeringSettings, StudentSettings, VectorSettings
from persona.study.records import PhaseRunner

UNSTEERED = "unsteered"
ANSWER_KEY = ("type", "set", "sample")
GRADE_KEY = ("experiment", "type", "grader", "set", "sample")
GRADE_RETRIES = 1  # extra passes over failed calls within one run (the API judge also retries each call)


@dataclass(frozen=True)
class Variant:
    """A student or grader type: unsteered, or one trait steered positive or negative."""

    name: str
    trait: str | None = None
    sign: int = 0


def variants(traits: Sequence[str]) -> list[Variant]:
    out = [Variant(UNSTEERED)]
    for trait in traits:
        out += [Variant(f"{trait}+", trait, 1), Variant(f"{trait}-", trait, -1)]
    return out


def words(text: str) -> int:
    return len(text.split())


@dataclass
class Study:
    run_dir: Path
    model: str
    sets: list[SetConfig]
    traits: list[str]
    students: StudentSettings
    graders: GraderSettings
    steering: SteeringSettings
    vectors: VectorSettings
    real_answers: list[dict]  # sampled real answers: set, sample (Id), answer, human1, human2
    seed: int = 0
    dtype: str = "float32"
    accelerator: str = "auto"
    grader_factory: Callable[[Study], dict[str, Grader]] | None = None  # tests: fake graders
    _loaded: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------ setup

    def model_and_tokenizer(self):
        if "pair" not in self._loaded:
            from persona.core.hardware import resolve_device
            from persona.models import load_model_and_tokenizer

            self._loaded["pair"] = load_model_and_tokenizer(
                self.model, dtype=self.dtype, device=resolve_device(self.accelerator)
            )
        return self._loaded["pair"]

    @property
    def min_mass(self) -> float:
        return MIN_MASS if self.graders.min_mass is None else self.graders.min_mass

    def run(self) -> None:
        steps = 2 + len(self.traits) + 3
        runner = PhaseRunner(self.run_dir, total=steps)
        self.info = runner.run(
            "model",
            {
                "model": self.model,
                "dtype": self.dtype,
                "layer": self.steering.layer,
                "sets": [s.set_id for s in self.sets],
            },
            self._model_phase,
        )
        self.layer = self.info["layer"]
        self.vector_info = {}
        from persona.education.trait_vectors import build_vector, choose_route, route_inputs

        for trait in self.traits:
            route = choose_route(trait, self.vectors)
            inputs = {
                "model": self.model,
                "dtype": self.dtype,
                "seed": self.seed,
                **route_inputs(trait, route, self.vectors),
            }
            self.vector_info[trait] = runner.run(
                f"vector_{trait}",
                inputs,
                lambda phase_dir, t=trait, r=route: build_vector(
                    t,
                    r,
                    self.vectors,
                    phase_dir,
                    model=self.model,
                    model_and_tokenizer=self.model_and_tokenizer,
                    seed=self.seed,
                    dtype=self.dtype,
                    accelerator=self.accelerator,
                ),
            )
        self._steering_table()
        self._announce(runner, "A: student answers")
        self.generate_answers()
        self._announce(runner, "A: grading the answers")
        a_graders = [UNSTEERED] + [n for n in self.grader_names() if n.startswith("api:")]
        if self.graders.cross_grade:
            a_graders = self.grader_names()
        answers = KeyedJournal(self.run_dir / "answers.jsonl", ANSWER_KEY).load()
        planned = {
            (v.name, s.set_id, k)
            for v in variants(self.traits)
            for s in self.sets
            for k in range(self.students.n_samples)
        }
        items = [dict(row) for key, row in answers.items() if key in planned]
        self.grade_items("A", items, a_graders)
        self._announce(runner, "B: grading real answers")
        self.grade_items("B", [{"type": "real", **row} for row in self.real_answers], self.grader_names())

    def _announce(self, runner: PhaseRunner, name: str) -> None:
        runner.done += 1
        print(f"[{runner.done}/{runner.total}] {name} ...", flush=True)

    def _model_phase(self, phase_dir: Path) -> dict:
        from persona.hooks import locate_blocks
        from persona.vectors.norms import mean_residual_norm

        lm, tokenizer = self.model_and_tokenizer()
        num_layers = locate_blocks(lm).num_layers
        layer = num_layers // 2 if self.steering.layer is None else self.steering.layer
        if not 1 <= layer <= num_layers:
            raise ValueError(
                f"steering.layer={layer}: {self.model} has layers 1..{num_layers}. Fix: choose one."
            )
        texts = [render_chat(tokenizer, student_messages(s)) for s in self.sets]
        norm = mean_residual_norm(lm, tokenizer, texts, layer)
        return {"model": self.model, "num_layers": num_layers, "layer": layer, "residual_norm": norm}

    def vector(self, trait: str) -> torch.Tensor:
        if trait not in self._loaded:
            from persona.vectors import load_vector

            self._loaded[trait] = load_vector(self.vector_info[trait]["path"])
        return self._loaded[trait]

    def spec(self, variant: Variant, role: str):
        """Steering of a student (``response`` positions) or a grader (``all``: see grading.py)."""
        from persona.steering import SteeringSpec

        coef = self.steering.coef
        if role == "grader" and self.steering.grader_coef is not None:
            coef = self.steering.grader_coef
        return SteeringSpec(
            self.layer,
            self.vector(variant.trait),
            variant.sign * coef,
            positions="response" if role == "student" else "all",
            relative=self.steering.relative,
            reference_norm=self.info["residual_norm"] if self.steering.relative else None,
        )

    def _steering_table(self) -> None:
        """Coefficients raw and relative to the residual norm at the layer, so runs on other models compare."""
        import pandas as pd

        rows = []
        for trait in self.traits:
            if self.vector(trait).shape[0] != self.info["num_layers"] + 1:
                raise ValueError(
                    f"{self.vector_info[trait]['path']} has {self.vector(trait).shape[0]} rows but {self.model} needs "
                    f"{self.info['num_layers'] + 1} (num_layers + 1). Fix: use vectors extracted from this model."
                )
            direction = self.vector(trait)[self.layer].double()
            vector_norm = float(direction.norm())
            row = {
                "trait": trait,
                "route": self.vector_info[trait]["route"],
                "detail": self.vector_info[trait]["detail"],
                "layer": self.layer,
                "vector_norm": vector_norm,
                "residual_norm": self.info["residual_norm"],
            }
            for role in ("student", "grader"):
                scale = self.spec(Variant(f"{trait}+", trait, 1), role).scale()
                row[f"{role}_coef_raw"] = scale
                row[f"{role}_coef_relative"] = scale * vector_norm / self.info["residual_norm"]
            rows.append(row)
        write_csv(self.run_dir / "steering.csv", pd.DataFrame(rows))
        write_json(self.run_dir / "vectors.json", self.vector_info)

    # ------------------------------------------------------------------------------------------ experiment A

    def generate_answers(self) -> None:
        from persona.steering import generate_steered

        journal = KeyedJournal(self.run_dir / "answers.jsonl", ANSWER_KEY)
        done = journal.keys()
        settings = self.students
        by_set = {s.set_id: s for s in self.sets}
        items = [(s.set_id, k) for s in self.sets for k in range(settings.n_samples)]
        plan = [
            (v, items[i : i + settings.batch_size])
            for v in variants(self.traits)
            for i in range(0, len(items), settings.batch_size)
        ]
        total = sum(len(chunk) for _, chunk in plan)
        finished = sum((v.name, *item) in done for v, chunk in plan for item in chunk)
        sampling = {"top_p": 1.0, "top_k": 0} if settings.temperature > 0 else {}
        with tqdm(total=total, initial=finished, desc="A answers", unit="answer") as bar:
            for variant, chunk in plan:
                if all((variant.name, *item) in done for item in chunk):
                    continue
                lm, tokenizer = self.model_and_tokenizer()
                specs = [] if variant.trait is None else [self.spec(variant, "student")]
                L.seed_everything(batch_seed(self.seed, variant.name, *chunk) % 2**32, verbose=False)
                start = time.perf_counter()
                texts = generate_steered(
                    lm,
                    tokenizer,
                    [student_messages(by_set[s]) for s, _ in chunk],
                    specs,
                    max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    batch_size=len(chunk),
                    min_new_tokens=1,
                    **sampling,
                )
                seconds = (time.perf_counter() - start) / len(chunk)
                rows = [
                    {
                        "type": variant.name,
                        "trait": variant.trait,
                        "sign": variant.sign,
                        "set": s,
                        "sample": k,
                        "answer": text.strip(),
                        "words": words(text),
                        "seconds": round(seconds, 3),
                    }
                    for (s, k), text in zip(chunk, texts, strict=True)
                    if (variant.name, s, k) not in done
                ]
                bar.update(journal.append(rows))

    # ------------------------------------------------------------------------------------------ grading

    def grader_names(self) -> list[str]:
        names = [v.name for v in variants(self.traits)]
        if self.graders.api:
            names.append(f"api:{self.graders.api.removeprefix('openai:')}")
        return names

    def build_graders(self) -> dict[str, Grader]:
        if "graders" in self._loaded:
            return self._loaded["graders"]
        if self.grader_factory is not None:
            graders = self.grader_factory(self)
        else:
            from persona.judges import LocalJudge

            lm, tokenizer = self.model_and_tokenizer()
            judge = LocalJudge(
                (lm, tokenizer),
                aggregation=RANGE_AGGREGATION,
                batch_size=self.graders.batch_size,
                name=f"local:{self.model}",
            )
            graders = {
                v.name: LocalRangeGrader(
                    v.name, judge, [] if v.trait is None else [self.spec(v, "grader")], self.min_mass
                )
                for v in variants(self.traits)
            }
            if self.graders.api:
                api = make_api_grader(
                    self.graders.api, self.graders.api_base_url, cache_dir=str(self.run_dir / "judge_cache")
                )
                graders[api.name] = api
        self._loaded["graders"] = graders
        return graders

    def grade_items(self, experiment: str, items: list[dict], grader_names: list[str]) -> None:
        journal = KeyedJournal(self.run_dir / "grades.jsonl", GRADE_KEY)
        failures = KeyedJournal(self.run_dir / "failures.jsonl", (*GRADE_KEY, "attempt"))
        done = journal.keys()

        def key(item, grader):
            return (experiment, item["type"], grader, item["set"], item["sample"])

        total = len(items) * len(grader_names)
        finished = sum(key(item, g) in done for item in items for g in grader_names)
        by_set = {s.set_id: s for s in self.sets}
        chunk_size = 4 * self.graders.batch_size  # rows appended per chunk: a kill loses at most one chunk
        with tqdm(total=total, initial=finished, desc=f"{experiment} grades", unit="grade") as bar:
            for name in grader_names:
                pending = [item for item in items if key(item, name) not in done]
                for attempt in range(1 + GRADE_RETRIES):
                    failed = []
                    for start in range(0, len(pending), chunk_size):
                        part = pending[start : start + chunk_size]
                        grades = self.build_graders()[name].grade(
                            [
                                grader_prompt(
                                    by_set[i["set"]], i["answer"], include_source=self.graders.include_source
                                )
                                for i in part
                            ],
                            [(by_set[i["set"]].min_score, by_set[i["set"]].max_score) for i in part],
                        )
                        rows, failed_rows = [], []
                        for item, grade in zip(part, grades, strict=True):
                            row = grade_row(experiment, name, item, grade)
                            if grade.failed:
                                failed.append(item)
                                failed_rows.append({**row, "attempt": attempt})
                            else:
                                rows.append(row)
                        failures.append(failed_rows)
                        bar.update(
                            journal.append(rows) + (len(failed_rows) if attempt == GRADE_RETRIES else 0)
                        )
                    if not failed:
                        break
                    pending = failed
                if failed:
                    print(
                        f"{experiment}, grader {name}: {len(failed)} grade(s) failed after {1 + GRADE_RETRIES} "
                        f"attempts; left missing (see failures.jsonl). Re-run the same command to retry them."
                    )


def grade_row(experiment: str, grader: str, item: dict, grade: Grade) -> dict:
    row = {
        "experiment": experiment,
        "type": item["type"],
        "grader": grader,
        "set": item["set"],
        "sample": item["sample"],
        "expected": grade.expected,
        "score": grade.score,
        "mass": grade.mass,
        "method": grade.method,
        "error": grade.error,
        "words": words(item["answer"]),
    }
    if "human1" in item:
        row.update(human1=item["human1"], human2=item["human2"])
    return row
