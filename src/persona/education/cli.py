"""``persona education``: the ASAP-SAS study (run), its report, and a comparison of runs."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import time
from pathlib import Path

from persona.core.constants import MIN_MASS
from persona.education.settings import (
    SEED_TRAITS,
    GraderSettings,
    SteeringSettings,
    StudentSettings,
    VectorSettings,
    test_plan,
)

ACTIONS = ("run", "report", "compare")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def default_run_dir(model: str, test: bool) -> Path:
    from persona.models import model_short_name

    return Path("runs") / "education" / (model_short_name(model) + ("-test" if test else ""))


def education(
    action: str = "run",
    data_dir: str | None = None,
    run_dir: str | None = None,
    test: bool = False,
    model: str = "smollm2-135m",
    traits: list[str] | None = None,
    sets: list[int] | None = None,
    students: StudentSettings = StudentSettings(),
    graders: GraderSettings = GraderSettings(),
    steering: SteeringSettings = SteeringSettings(),
    vectors: VectorSettings = VectorSettings(),
    sets_path: str | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
    overwrite: bool = False,
    dtype: str = "float32",
    accelerator: str = "auto",
    runs: list[str] | None = None,
    out_dir: str = "runs/education/compare",
) -> str:
    """ASAP-SAS study: how persona steering changes students' answers (A) and graders' scores (B).

    `persona education --test` runs the study offline on the embedded model with the shipped sample;
    `persona education report --run_dir D` rewrites a run's report; `persona education compare --runs D1,D2`
    writes a cross-model report. Re-running the same command resumes the run.

    Args:
        action: run (the study, then its report), report (report.md of --run_dir) or compare (--runs); may be
            given as the first word: `persona education report ...`.
        data_dir: Directory with the ASAP-SAS train.tsv (or the file); default the shipped synthetic sample.
        run_dir: Run directory (resumed when it exists); default runs/education/<model>[-test].
        test: Smoke run: 2 traits x 2 sets x 1 sample, 3 real answers per set, short answers, grader prompts
            without the reading passage, every grader on A (see persona.education.settings.test_plan).
        model: Student and local-grader model: alias (smollm2-135m), hub id or local path.
        traits: Traits to steer with; default the seven seed traits.
        sets: Essay sets (1-10) to use; default all.
        students: Experiment A's student answers.
        graders: Graders (local, steered, API) and experiment B's sampling.
        steering: Steering layer and coefficients.
        vectors: How each trait's persona vector is made.
        sets_path: Per-set configuration JSON; default the shipped datasets/asap_sas/sets.json.
        seed: Base seed of every sampling step (answers, real-answer draws, bootstrap).
        n_bootstrap: Bootstrap resamples for the confidence intervals.
        overwrite: Delete the run directory's results and start over.
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: Lightning accelerator for the extraction/generation loops (cpu, gpu, auto).
        runs: With --action compare: the run directories to compare, as D1,D2 or '[D1, D2]'.
        out_dir: With --action compare: where the comparison goes.
    """
    if action not in ACTIONS:
        raise ValueError(f"--action {action!r}. Fix: use one of {', '.join(ACTIONS)}.")
    if action == "report":
        from persona.education.report import write_report

        if run_dir is None:
            raise ValueError("--action report needs --run_dir (a directory made by `persona education`).")
        return str(write_report(run_dir))
    if action == "compare":
        from persona.education.compare import compare_runs

        return str(compare_runs(list(runs or []), out_dir))
    return run_study(
        data_dir=data_dir,
        run_dir=run_dir,
        test=test,
        model=model,
        traits=traits,
        sets=sets,
        students=students,
        graders=graders,
        steering=steering,
        vectors=vectors,
        sets_path=sets_path,
        seed=seed,
        n_bootstrap=n_bootstrap,
        overwrite=overwrite,
        dtype=dtype,
        accelerator=accelerator,
    )


def run_study(
    *,
    data_dir=None,
    run_dir=None,
    test=False,
    model="smollm2-135m",
    traits=None,
    sets=None,
    students=StudentSettings(),
    graders=GraderSettings(),
    steering=SteeringSettings(),
    vectors=VectorSettings(),
    sets_path=None,
    seed=0,
    n_bootstrap=1000,
    overwrite=False,
    dtype="float32",
    accelerator="auto",
    grader_factory=None,
) -> str:
    """The study end to end; ``grader_factory`` (tests only) replaces the model graders."""
    from persona.core.store import check_signature, write_json
    from persona.education.report import write_report
    from persona.education.study import Study

    started = time.perf_counter()
    if test:
        traits, sets, students, graders, vectors = test_plan(traits, sets, students, graders, vectors)
    traits = check_traits(traits, vectors)
    if n_bootstrap < 0:
        raise ValueError(f"--n_bootstrap {n_bootstrap}: must be >= 0.")
    # Every input is read and checked before a model loads.
    inputs = read_inputs(data_dir, sets_path, sets, graders.n_real, seed)
    if graders.api:  # a missing key or URL fails now, not after the students have written their answers
        from persona.education.grading import make_api_grader

        make_api_grader(graders.api, graders.api_base_url, cache_dir=None)
    run = Path(run_dir) if run_dir else default_run_dir(model, test)
    prepare_run_dir(run, overwrite)
    min_mass = MIN_MASS if graders.min_mass is None else graders.min_mass
    check_signature(
        run / "meta.json",
        study_signature(model, dtype, seed, inputs, students, graders, min_mass, steering, vectors),
        command="persona education",
        subject=run,
        fix="choose another --run_dir, or pass --overwrite true to start over",
    )
    types = 1 + 2 * len(traits)
    print(
        f"persona education: {len(traits)} trait(s) x {len(inputs.sets)} set(s); A: {types} student "
        f"types x {students.n_samples} sample(s); B: {len(inputs.real)} real answers x {types}"
        f"{' + API' if graders.api else ''} graders -> {run}"
    )
    study = Study(
        run_dir=run,
        model=model,
        sets=inputs.sets,
        traits=traits,
        students=students,
        graders=dataclasses.replace(graders, min_mass=min_mass),
        steering=steering,
        vectors=vectors,
        real_answers=inputs.real,
        seed=seed,
        dtype=dtype,
        accelerator=accelerator,
        grader_factory=grader_factory,
    )
    settings = run_settings(model, test, seed, n_bootstrap, traits, inputs, min_mass, students, graders,
                            steering, vectors)  # fmt: skip
    write_json(run / "settings.json", settings)  # the report can be written from a half-finished run
    study.run()
    write_json(
        run / "settings.json",
        {**settings, "model_info": study.info, "seconds_last_run": time.perf_counter() - started},
    )
    path = write_report(run)
    print(f"persona education: done in {time.perf_counter() - started:.0f} s")
    return str(path)


def run_settings(
    model, test, seed, n_bootstrap, traits, inputs, min_mass, students, graders, steering, vectors
) -> dict:
    """What settings.json records of a run: everything the report and a comparison read back."""
    return {
        "model": model,
        "test": test,
        "seed": seed,
        "n_bootstrap": n_bootstrap,
        "traits": traits,
        **inputs.settings(),
        "human_reference": graders.human_reference,
        "min_mass": min_mass,
        "students": dataclasses.asdict(students),
        "graders": dataclasses.asdict(graders),
        "steering": dataclasses.asdict(steering),
        "vectors": dataclasses.asdict(vectors),
    }


def check_traits(traits: list[str] | None, vectors: VectorSettings) -> list[str]:
    """The traits to steer with (default the seed traits); an unknown trait or an impossible vector route fails
    now, not after a model load."""
    from persona.data.traits import load_trait
    from persona.education.trait_vectors import choose_route

    traits = list(traits if traits is not None else SEED_TRAITS)
    for trait in traits:
        load_trait(trait, "extract")
        choose_route(trait, vectors)
    return traits


@dataclasses.dataclass(frozen=True)
class StudyInputs:
    """The files the study reads, and what it takes from them."""

    sets_file: Path
    answer_file: Path
    sets: list  # the chosen essay sets
    real: list[dict]  # experiment B's real answers, with their human scores

    def settings(self) -> dict:
        from persona.education.data import default_data_dir

        return {
            "sets": [s.set_id for s in self.sets],
            "sets_path": str(self.sets_file.resolve()),
            "data_file": str(self.answer_file),
            "synthetic_data": self.answer_file.resolve().parent == default_data_dir().resolve(),
        }


def read_inputs(data_dir, sets_path, sets, n_real: int, seed: int) -> StudyInputs:
    """Sets and answers, read and checked; ``n_real`` real answers per set sampled for experiment B."""
    from persona.education.data import (
        choose_sets,
        default_data_dir,
        default_sets_path,
        find_answer_file,
        load_sets,
        read_answers,
        sample_answers,
    )

    sets_file = Path(sets_path) if sets_path else default_sets_path()
    all_sets = load_sets(sets_file)
    chosen = choose_sets(all_sets, sets)
    answer_file = find_answer_file(data_dir if data_dir is not None else default_data_dir())
    answers = read_answers(answer_file, all_sets)
    sampled = sample_answers(answers, [s.set_id for s in chosen], n_real, seed)
    real = [
        {
            "set": int(r.EssaySet),
            "sample": int(r.Id),
            "answer": r.EssayText,
            "human1": float(r.Score1),
            "human2": None if math.isnan(r.Score2) else float(r.Score2),
        }
        for r in sampled.itertuples()
    ]
    empty = [s.set_id for s in chosen if not any(r["set"] == s.set_id for r in real)]
    if empty:
        print(f"note: {answer_file} has no answers for set(s) {empty}; experiment B skips them.")
    return StudyInputs(sets_file, answer_file, chosen, real)


# What a study writes in its run directory: its files, and its phase folders ("model", "vector_<trait>").
RUN_FILES = (
    "meta.json", "settings.json", "answers.jsonl", "grades.jsonl", "failures.jsonl", "steering.csv", "vectors.json",
    "judge_cache", "figures", "tables", "report.md", "model",
)  # fmt: skip


def prepare_run_dir(run: Path, overwrite: bool) -> None:
    """Refuse a folder that is not a study run; with ``overwrite``, delete the run's results first.

    Only a run directory holding nothing but what a study writes is deleted: a file of the user's inside it is
    named, and the run is left as it is.
    """
    if overwrite and run.exists():
        if not (run / "meta.json").is_file():
            raise ValueError(
                f"--overwrite: {run} is not a study run directory (no meta.json); not deleting it."
            )
        foreign = sorted(entry.name for entry in run.iterdir() if not _written_by_study(entry.name))
        if foreign:
            raise ValueError(
                f"--overwrite: {run} holds {', '.join(foreign)}, which the study did not write; not deleting the "
                "run. Fix: move them out, or choose another --run_dir."
            )
        shutil.rmtree(run)
    if run.exists() and any(run.iterdir()) and not (run / "meta.json").is_file():
        raise ValueError(
            f"--run_dir {run} exists and is not a study run directory. Fix: choose another --run_dir."
        )


def _written_by_study(name: str) -> bool:
    return name in RUN_FILES or name.startswith("vector_") or name.endswith(".damaged")


def study_signature(
    model, dtype, seed, inputs: StudyInputs, students, graders, min_mass, steering, vectors
) -> dict:
    """The settings a resumed run must share with the run it continues (see persona.core.store.check_signature)."""
    from persona.education.prompts import PROMPT_VERSION

    return {
        "model": model,
        "dtype": dtype,
        "seed": seed,
        "prompt_version": PROMPT_VERSION,
        "answers_sha256": _sha256(inputs.answer_file),
        "sets_sha256": _sha256(inputs.sets_file),
        "students": {k: v for k, v in dataclasses.asdict(students).items() if k != "n_samples"},
        "graders": {"min_mass": min_mass, "include_source": graders.include_source},
        "steering": dataclasses.asdict(steering),
        "vectors": dataclasses.asdict(vectors),
    }
