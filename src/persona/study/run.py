"""The study: the whole method on one model, its judge and its hardware, ending in ``report.md``.

Phases, each cached by its inputs in the run directory so a re-run (or a run killed at any point) resumes
where it stopped: per trait, vectors from contrastive pairs → per-layer held-out separation → judge-free
steering sweep → judged steering sweep → the paper's route (persona-prompted answers judged, filtered,
extracted); then for the first trait, steered generations → fine-tuning study (mixtures, preventative
steering, CAFT, monitor, finetuning shift, ΔP screening) → llama.cpp export. The model is loaded once per
process (:func:`persona.models.shared_models`) and every phase runs on the configured hardware.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict
from pathlib import Path

from persona.report import PhaseRunner
from persona.store import write_json
from persona.study.config import (
    Hardware,
    JudgeSettings,
    Phases,
    Sizes,
    StudyTrait,
    trait_key,
    trait_pairs_path,
)
from persona.study.context import StudyContext
from persona.study.report import summary_table, write_report


def run_study(
    *,
    model: str,
    traits: list[StudyTrait],
    judge: JudgeSettings,
    phases: Phases,
    hardware: Hardware,
    sizes: Sizes,
    run_dir: str | Path,
    layer: int | None = None,
    title: str = "persona study",
) -> str:
    """Run (or resume) the study in ``run_dir``; returns the report's path. Inputs are checked by the caller."""
    from persona.models import shared_models

    start = time.perf_counter()
    run = Path(run_dir)
    keys = [trait_key(t) for t in traits]
    steps = 1 + len(traits) * (1 + phases.layers + phases.sweep + phases.judged_sweep)
    steps += (
        sum(t.generate for t in traits) * phases.generated
        + phases.generations
        + phases.finetune
        + phases.export
    )
    context = StudyContext(model=model, judge=judge, hardware=hardware, sizes=sizes)
    runner = PhaseRunner(run, total=steps, device=context.device())
    results: dict = {
        "title": title,
        "trait": keys[0],
        "traits": {},
        "config": study_record(model, traits, judge, phases, hardware, sizes),
    }
    with shared_models():
        results["model"] = runner.run("model", {"model": model, "dtype": hardware.dtype}, context.hello)
        for trait, key in zip(traits, keys, strict=True):
            results["traits"][key] = trait_phases(runner, context, trait, key, phases, layer)
        main = results["traits"][keys[0]]
        if "layers" not in main:
            raise ValueError(
                "phases.layers is off, but the later phases steer at the recommended layer. Fix: turn it on."
            )
        vector_path, layer = main["vectors"]["response_avg"], main["layers"]["recommended"]
        stamp = {"vectors": vector_path, "layer": layer, **context.stamp()}
        if phases.generations:
            results["generations"] = runner.run(
                "generations", stamp, lambda d: context.generations(d, vector_path, layer)
            )
        if phases.finetune:
            results["finetune"] = runner.run(
                "finetune",
                {**stamp, "trait": keys[0]},
                lambda d: context.finetune(d, keys[0], vector_path, layer),
            )
        if phases.export:
            results["export"] = runner.run(
                "export_gguf", stamp, lambda d: context.export(d, keys[0], vector_path, layer)
            )
    results["timings"] = {**runner.timings, "total (this invocation)": time.perf_counter() - start}
    results["devices"] = runner.devices
    results["matmul_gflops"] = context.matmul_rate()
    # ru_maxrss is in KiB on Linux: the peak of this process, i.e. of the whole study when run in one go.
    results["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["not_run"] = [name for name, on in asdict(phases).items() if not on]
    write_json(run / "results.json", results)
    report_path = write_report(run)
    print("\nSummary")
    for row in summary_table(results).itertuples(index=False):
        print(f"  {row.measure}: {row.value} (target {row.target})")
    print(f"Report: {report_path}")
    return str(report_path)


def trait_phases(
    runner: PhaseRunner, context, trait: StudyTrait, key: str, phases: Phases, layer: int | None
) -> dict:
    """One trait's phases. With contrastive pairs: vectors from their train split, layer metrics on the held-out
    test split; with ``generate``: the paper's route (persona-prompted answers, judged, filtered, extracted),
    which is the vectors' only source for a trait without pairs (its layer metrics are then in-sample)."""
    source = trait_pairs_path(trait)
    stamp = {"model": context.model, **context.stamp()}
    if source is not None:
        stamp.update({"source": str(source), "mtime": source.stat().st_mtime})
    out: dict = {}
    if source is not None:
        out["vectors"] = runner.run(f"extract_{key}", stamp, lambda d: context.extract(d, key, source))[
            "vectors"
        ]
    if trait.generate and (phases.generated or source is None):
        out["generated"] = runner.run(f"generated_{key}", stamp, lambda d: context.generated(d, key))
        out.setdefault("vectors", out["generated"]["vectors"])
    vector = out["vectors"]["response_avg"]
    if phases.layers:
        inputs = (
            {"pairs": source}
            if source is not None
            else {"csvs": (out["generated"]["pos_csv"], out["generated"]["neg_csv"])}
        )
        out["layers"] = runner.run(
            f"layers_{key}",
            {**stamp, "vectors": out["vectors"]},
            lambda d: context.layers(d, vector, **inputs),
        )
    layer = layer if layer is not None else out.get("layers", {}).get("recommended")
    if phases.sweep and layer is not None and source is not None:
        out["sweep"] = runner.run(
            f"sweep_{key}", {**stamp, "layer": layer}, lambda d: context.sweep(d, key, vector, source, layer)
        )
    if phases.judged_sweep and layer is not None and has_eval_questions(trait.name):
        out["judged_sweep"] = runner.run(
            f"judged_sweep_{key}",
            {**stamp, "layer": layer},
            lambda d: context.judged_sweep(d, key, vector, layer),
        )
    generated = out.get("generated")
    if generated and layer is not None and source is not None:
        generated["cosine_with_pairs_vector"] = vector_cosine(
            generated["vectors"]["response_avg"], vector, layer
        )
        generated["layer"] = layer
    return out


def has_eval_questions(name: str) -> bool:
    """Whether the trait has eval artifacts (questions and a judge prompt): TRAIT-item traits have none."""
    from persona.traits import TraitError, load_trait

    try:
        load_trait(name, "eval")
    except TraitError:
        return False
    return True


def vector_cosine(a: str, b: str, layer: int) -> float:
    import torch

    from persona.vectors import load_vector

    return float(torch.nn.functional.cosine_similarity(load_vector(a)[layer], load_vector(b)[layer], dim=0))


def study_record(model, traits, judge, phases, hardware, sizes) -> dict:
    """The settings as they go into results.json (the judge's key never does: it lives in the environment)."""
    return {
        "model": model,
        "traits": [asdict(t) for t in traits],
        "judge": asdict(judge),
        "phases": asdict(phases),
        "hardware": asdict(hardware),
        "sizes": asdict(sizes),
    }
