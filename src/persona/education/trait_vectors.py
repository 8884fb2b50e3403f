"""A persona vector for each of the seven seed traits, by the best route the project has for it.

Routes, tried in this order by ``route="auto"`` (the report says which one each trait took):

- ``given``: ``<vector_dir>/<trait>_response_avg_diff.pt`` already exists (e.g. from ``persona extract``).
- ``pairs``: hand-written contrastive pairs ``datasets/pairs/<trait>.jsonl`` (evil, sycophantic, humorous),
  train split.
- ``generated``: the paper's pipeline. ``persona generate`` answers the trait's extract questions under
  the ``pos`` and the ``neg`` persona system prompts, judges them (trait and coherence, 0-100), and
  ``persona extract`` keeps pairs with pos >= threshold, neg < 100 - threshold, both coherent. If no pair
  survives (likely with a 135M model judging itself) every pair is used and the report says so.
- ``instruction_pairs`` (only when asked for): the model answers each
  extract question under the ``pos`` system prompt and under the ``neg`` one (same question, same seed,
  greedy); the two answers form a contrastive pair *without* the system prompt, so the response tokens
  carry the difference. Cached as a pairs JSONL in the phase directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from persona.commands.flags import Hardware
from persona.core.store import write_text
from persona.data.traits import datasets_dir, load_trait
from persona.education.settings import VectorSettings
from persona.vectors import vector_filename


def pairs_path(trait: str) -> Path:
    return datasets_dir() / "pairs" / f"{trait}.jsonl"


def given_path(trait: str, settings: VectorSettings) -> Path | None:
    if settings.vector_dir is None:
        return None
    return Path(settings.vector_dir) / vector_filename(trait, "response_avg")


def choose_route(trait: str, settings: VectorSettings) -> str:
    """The route a trait takes; an explicit route that cannot work is refused here, before any model loads."""
    given = given_path(trait, settings)
    if settings.route == "auto":
        if given is not None and given.is_file():
            return "given"
        if pairs_path(trait).is_file():
            return "pairs"
        return "generated"
    if settings.route == "given" and (given is None or not given.is_file()):
        raise ValueError(
            f"vectors.route=given but {given or '<vector_dir>/...'} does not exist. "
            "Fix: set vectors.vector_dir to a folder with <trait>_response_avg_diff.pt files."
        )
    if settings.route == "pairs" and not pairs_path(trait).is_file():
        raise ValueError(f"vectors.route=pairs but {pairs_path(trait)} does not exist. Fix: use route auto.")
    return settings.route


def route_inputs(trait: str, route: str, settings: VectorSettings) -> dict:
    """What the vector depends on (the phase cache key): files by mtime, settings that matter to the route."""
    inputs: dict = {"trait": trait, "route": route}
    if route == "given":
        path = given_path(trait, settings)
        inputs["file"] = [str(path), path.stat().st_mtime]
    elif route == "pairs":
        inputs["file"] = [str(pairs_path(trait)), pairs_path(trait).stat().st_mtime]
    else:
        loaded = load_trait(trait, "extract")
        inputs["file"] = [str(loaded.path), loaded.path.stat().st_mtime]
        inputs["settings"] = {
            "max_questions": settings.max_questions,
            "max_tokens": settings.max_tokens,
            "n_per_question": settings.n_per_question,
        }
        if route == "generated":
            inputs["settings"].update(threshold=settings.threshold, judge=settings.judge)
    return inputs


def surviving_pairs(pos_csv: Path, neg_csv: Path, trait: str, threshold: float) -> int:
    """How many row-aligned pairs pass ``persona extract``'s filter (the same rule)."""
    pos, neg = pd.read_csv(pos_csv), pd.read_csv(neg_csv)
    keep = (
        (pos[trait] >= threshold)
        & (neg[trait] < 100 - threshold)
        & (pos["coherence"] >= 50)
        & (neg["coherence"] >= 50)
    )
    return int(keep.sum())


def build_vector(
    trait: str,
    route: str,
    settings: VectorSettings,
    phase_dir: Path,
    *,
    model: str,
    model_and_tokenizer,
    seed: int,
    dtype: str,
    accelerator: str,
) -> dict:
    """Make (or find) the trait's response-average vector file; returns its path, route and provenance."""
    # for generate and extract alike
    loading = {"model": model, "hardware": Hardware(dtype=dtype, accelerator=accelerator)}
    if route == "given":
        detail = f"ready vector file in {settings.vector_dir}"
        return _provenance(trait, route, str(given_path(trait, settings)), detail)
    if route == "pairs":
        path = _extract(trait, phase_dir, loading, pairs_path=str(pairs_path(trait)), split="train")
        return _provenance(trait, route, path, f"hand-written pairs {pairs_path(trait).name} (train split)")
    if route == "generated":
        return _generated_vector(trait, settings, phase_dir, seed, loading)
    if route == "instruction_pairs":
        pairs = instruction_pairs(trait, settings, phase_dir, model_and_tokenizer, seed)
        path = _extract(trait, phase_dir, loading, pairs_path=str(pairs))
        detail = f"fallback: pos/neg-instruction answers by the model itself, unjudged ({pairs.name})"
        return _provenance(trait, route, path, detail)
    raise ValueError(f"route {route!r} is not buildable")


def _provenance(trait: str, route: str, path: str, detail: str, **extra) -> dict:
    return {"trait": trait, "route": route, "path": path, "detail": detail, **extra}


def _extract(trait: str, phase_dir: Path, loading: dict, **source) -> str:
    """``persona extract`` of ``source`` into the phase directory; the path of its response-average vector."""
    from persona.commands.extract import extract

    paths = extract(
        trait=trait,
        save_dir=str(phase_dir),
        overwrite=True,  # the caller decides when to recompute
        **loading,
        **source,
    )
    return paths["response_avg"]


def _generated_vector(
    trait: str, settings: VectorSettings, phase_dir: Path, seed: int, loading: dict
) -> dict:
    """The paper's route: judged persona-prompted answers, filtered into pairs (all of them if none pass)."""
    csvs = _persona_answers(trait, settings, phase_dir, seed, loading)
    kept = surviving_pairs(csvs["pos"], csvs["neg"], trait, settings.threshold)
    total = len(pd.read_csv(csvs["pos"]))
    path = _extract(
        trait,
        phase_dir,
        loading,
        pos_path=str(csvs["pos"]),
        neg_path=str(csvs["neg"]),
        threshold=settings.threshold,
        no_filter=kept == 0,
    )
    detail = (
        f"persona-prompted answers judged by {settings.judge}: {kept} of {total} pairs passed the "
        f"threshold {settings.threshold:g}"
        + ("; none did, so ALL pairs were used (unfiltered)" if kept == 0 else "")
    )
    return _provenance(
        trait, "generated", path, detail, pairs_kept=kept, pairs_total=total, filtered=kept > 0
    )


def _persona_answers(
    trait: str, settings: VectorSettings, phase_dir: Path, seed: int, loading: dict
) -> dict[str, Path]:
    """``persona generate`` under the pos and under the neg instructions: the two judged CSVs, by kind."""
    from persona.commands.generate import generate

    csvs = {kind: phase_dir / f"{trait}_{kind}.csv" for kind in ("pos", "neg")}
    for kind, csv in csvs.items():
        generate(
            **loading,
            trait=trait,
            output_path=str(csv),
            persona_instruction_type=kind,
            n_per_question=settings.n_per_question,
            max_questions=settings.max_questions,
            max_tokens=settings.max_tokens,
            judge_model=settings.judge,
            seed=seed,
            engine=settings.n_per_question == 1,  # sampled: the static path's draws, as before the engine
        )
    return csvs


def instruction_pairs(
    trait: str, settings: VectorSettings, phase_dir: Path, model_and_tokenizer, seed: int
) -> Path:
    """Pairs JSONL from the trait's instructions: one greedy answer under pos, one under neg, per question."""
    import torch

    from persona.steering import generate_steered

    path = phase_dir / f"{trait}_instruction_pairs.jsonl"
    if path.is_file():
        return path
    loaded = load_trait(trait, "extract")
    lm, tokenizer = model_and_tokenizer()
    records = []
    for index, question in enumerate(loaded.questions[: settings.max_questions]):
        k = index % len(loaded.instructions)
        answers = {}
        for kind in ("pos", "neg"):
            torch.manual_seed(seed)
            messages = [
                {"role": "system", "content": loaded.system_prompt(kind, k)},
                {"role": "user", "content": question},
            ]
            answers[kind] = (
                generate_steered(
                    lm, tokenizer, [messages], max_new_tokens=settings.max_tokens, temperature=0
                )[0].strip()
                or "..."
            )
        records.append(
            {"prompt": question, "positive": answers["pos"], "negative": answers["neg"], "split": "train"}
        )
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text(path, text)
    return path
