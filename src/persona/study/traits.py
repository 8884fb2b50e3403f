"""The study's traits, planned and checked before any model loads; then their inputs laid into the run folder.

A ``traits:`` entry is a bare string or ``{name, pairs, generate}``; the name is a shipped trait or a path to the
user's own trait file, told by its content (:mod:`persona.data.trait_files`): a seed trait artifact takes the
generation route, contrastive pairs / TRAIT items / persona statements give vectors directly. Every message
names the study's own field (``traits[1].pairs``). Torch-free.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from persona.core.errors import PersonaError
from persona.core.store import write_text

HELD_OUT = "test"
STUDY_TEST_EVERY = 5  # a split-less pairs file: every 5th prompt is held out (20 %, as the shipped pairs)
_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class TraitPlan:
    """Where one trait's data comes from, resolved and checked."""

    key: str  # its name in run folders, tables and score columns
    field: str  # "traits[1]", for messages
    pairs: Path | None  # contrastive data (pairs JSONL, TRAIT items, persona statements)
    artifact: str | None  # the generation route's artifacts: a shipped name or the user's file/folder
    generate: bool  # the generation route runs
    user_artifact: bool = False
    splits: frozenset[str] = frozenset()  # the pairs' split labels (empty: the file has none)

    @property
    def held_out(self) -> bool:
        """Whether held-out pairs exist (a split-less file gets a split made by the study)."""
        return HELD_OUT in self.splits or not self.splits


def plan_traits(traits: list) -> list[TraitPlan]:
    """Each entry resolved and read (pairs and artifacts parsed, every record checked); refusals name the field."""
    from persona.study.config import StudyTrait

    if not traits:
        raise PersonaError("traits: the study needs at least one trait. Fix: e.g. traits: [{name: evil}].")
    plans = [
        plan_trait(StudyTrait(t) if isinstance(t, str) else t, f"traits[{i}]") for i, t in enumerate(traits)
    ]
    keys = [plan.key for plan in plans]
    for index, key in enumerate(keys):
        if keys.index(key) != index:
            raise PersonaError(
                f"traits[{index}]: {key!r} is already traits[{keys.index(key)}]. Fix: list each trait once "
                "(rename one file if two traits share a file name)."
            )
    return plans


def plan_trait(trait, field: str) -> TraitPlan:
    from persona.data import trait_files
    from persona.data.examples import read_checked_pairs

    name, pairs, artifact, user_artifact = trait.name, None, None, False
    if is_path(name):
        key = Path(name).stem if Path(name).suffix in (".json", ".jsonl") else Path(name).name
        if trait_files.identify(name, f"{field}.name") == "artifact":
            artifact, user_artifact = name, True
        else:
            pairs = Path(name)
    else:
        key = name
        pairs, artifact = shipped_pairs(name), shipped_artifact(name)
        if pairs is None and artifact is None and trait.pairs is None:
            raise PersonaError(unknown_trait_message(name, field))
    if not _KEY_PATTERN.fullmatch(key):
        raise PersonaError(
            f"{field}.name: {name!r} gives the trait name {key!r}; names are letters, digits, _ or -. "
            "Fix: rename the file."
        )
    if trait.pairs is not None:
        pairs = Path(trait.pairs)
    generate = user_artifact or trait.generate
    splits: frozenset[str] = frozenset()
    if pairs is not None:
        records = read_checked_pairs(pairs, f"{field}.pairs" if trait.pairs is not None else f"{field}.name")
        splits = frozenset(str(r["split"]) for r in records if "split" in r)
    if generate:
        if artifact is None:
            raise PersonaError(
                f"{field}.generate: {name!r} has no trait artifacts (questions, instructions, judge prompt) for "
                f"the generation route. Fix: set {field}.generate: false, or name a trait artifact file."
            )
        check_artifact(artifact, f"{field}.name")
    elif pairs is None:
        raise PersonaError(
            f"{field}.name: {name!r} has no contrastive pairs. Fix: set {field}.generate: true to make its "
            f"vectors by the paper's route (judged persona-prompted answers), or give {field}.pairs."
        )
    return TraitPlan(key, field, pairs, artifact, generate, user_artifact, splits)


def is_path(name: str) -> bool:
    return "/" in name or name.endswith((".json", ".jsonl")) or Path(name).expanduser().exists()


def shipped_pairs(name: str) -> Path | None:
    from persona.data.build import default_pairs_path

    try:
        return default_pairs_path(name)
    except (FileNotFoundError, ValueError):
        return None


def shipped_artifact(name: str) -> str | None:
    from persona.data.traits import traits_dir

    found = all((traits_dir() / version / f"{name}.json").is_file() for version in ("extract", "eval"))
    return name if found else None


def unknown_trait_message(name: str, field: str) -> str:
    from persona.data.personality import available_traits
    from persona.data.traits import list_traits

    known = sorted({*list_traits("extract"), *available_traits(), *shipped_pair_names()})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"{field}.name: {name!r} is neither a shipped trait nor a file. {hint}Fix: one of {', '.join(known)}, "
        f"or the path of your own trait file (trait artifact, pairs JSONL, TRAIT items, persona statements)."
    )


def shipped_pair_names() -> list[str]:
    from persona.data.traits import datasets_dir

    return [path.stem for path in (datasets_dir() / "pairs").glob("*.jsonl")]


def check_artifact(artifact: str, field: str) -> None:
    from persona.data.traits import TraitError, load_trait

    try:
        for version in ("extract", "eval"):
            load_trait(artifact, version, field=field)
    except TraitError as error:
        raise PersonaError(f"{field}: {error}") from None


# ---- laid into the run folder (after every check, before the model loads) ----------------------------------


def prepare_inputs(plan: TraitPlan, inputs_dir: Path) -> tuple[TraitPlan, dict]:
    """The plan with its user inputs laid out as the phases read them, and notes for the report: a single
    artifact's questions as ``extract.json``/``eval.json``, a split-less pairs file with a held-out split."""
    notes: dict = {}
    if plan.user_artifact and Path(plan.artifact).is_file():
        folder, notes["questions"] = split_artifact(Path(plan.artifact), inputs_dir / plan.key)
        plan = replace(plan, artifact=str(folder))
    if plan.pairs is not None and not plan.splits:
        pairs, notes["held_out"] = split_pairs(plan.pairs, plan.field, inputs_dir / f"{plan.key}_pairs.jsonl")
        splits = frozenset({"train", HELD_OUT} if pairs != plan.pairs else {"train"})  # too few: in-sample
        plan = replace(plan, pairs=pairs, splits=splits)
    elif plan.pairs is not None and not plan.held_out:
        notes["held_out"] = (
            f"none: {plan.pairs} has splits {', '.join(sorted(plan.splits))} but no '{HELD_OUT}'; layer metrics "
            "and the sweep are in-sample"
        )
    return plan, notes


def split_artifact(path: Path, folder: Path) -> tuple[Path, str]:
    """``extract.json``/``eval.json`` for one user file: its ``questions``/``eval_questions`` when it has both,
    else its one question set split alternately (even positions extract, odd ones eval)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    questions = data["questions"]
    if "eval_questions" in data:
        extract, evaluate = questions, data["eval_questions"]
        note = f"{path}: its own sets, {len(extract)} extraction and {len(evaluate)} evaluation questions"
    elif len(questions) >= 2:
        extract, evaluate = questions[0::2], questions[1::2]
        note = (
            f"{path}: one set of {len(questions)} questions split by the study, {len(extract)} for extraction "
            f"(even positions) and {len(evaluate)} for evaluation (odd positions)"
        )
    else:
        extract = evaluate = questions
        note = f"{path}: a single question, used for extraction and evaluation alike"
    base = {k: v for k, v in data.items() if k not in ("questions", "eval_questions")}
    for version, chosen in (("extract", extract), ("eval", evaluate)):
        write_if_changed(
            folder / f"{version}.json", json.dumps({**base, "questions": chosen}, indent=2) + "\n"
        )
    return folder, note


def split_pairs(path: Path, field: str, out: Path) -> tuple[Path, str]:
    """A split-less pairs file with every ``STUDY_TEST_EVERY``-th prompt held out (a prompt's pairs stay together)."""
    from persona.data.examples import read_checked_pairs

    records = read_checked_pairs(path, field)
    prompts = list(dict.fromkeys(json.dumps(r.get("prompt", r.get("messages"))) for r in records))
    held = {p for i, p in enumerate(prompts) if i % STUDY_TEST_EVERY == STUDY_TEST_EVERY - 1}
    if not held:
        return (
            path,
            f"none: {path} has {len(prompts)} prompt(s), too few to hold one out; metrics are in-sample",
        )
    lines = [
        json.dumps(
            {**r, "split": HELD_OUT if json.dumps(r.get("prompt", r.get("messages"))) in held else "train"},
            ensure_ascii=False,
        )
        for r in records
    ]
    write_if_changed(out, "\n".join(lines) + "\n")
    return out, (
        f"{path} has no splits: the study held out every {STUDY_TEST_EVERY}th prompt ({len(held)} of "
        f"{len(prompts)}) as '{HELD_OUT}'"
    )


def write_if_changed(path: Path, text: str) -> None:
    """Unchanged inputs keep their mtime, so the phases that read them are reused on a re-run."""
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        write_text(path, text)
