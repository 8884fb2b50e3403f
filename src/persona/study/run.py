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

from persona.core.errors import StudyIncomplete
from persona.core.store import write_json
from persona.study.config import Hardware, JudgeSettings, Phases, Sizes, StudyTrait
from persona.study.context import StudyContext
from persona.study.records import PhaseRunner
from persona.study.report import summary_table, write_report
from persona.study.traits import TraitPlan, prepare_inputs


def run_study(
    *,
    model: str,
    traits: list[StudyTrait | str],
    plans: list[TraitPlan],
    judge: JudgeSettings,
    phases: Phases,
    hardware: Hardware,
    sizes: Sizes,
    run_dir: str | Path,
    layer: int | None = None,
    personality_arm: str | None = None,
    title: str = "persona study",
) -> str:
    """Run (or resume) the study in ``run_dir``; returns the report's path. Inputs are checked by the caller
    (``plans`` from :func:`persona.study.checks.check_config`). One trait's missed phase never stops the
    others: the report lists what was missed and why, and :class:`StudyIncomplete` is raised after it."""
    from persona.models import shared_models

    start = time.perf_counter()
    run = Path(run_dir)
    prepared = [prepare_inputs(plan, run / "inputs") for plan in plans]
    plans, notes = [plan for plan, _ in prepared], {plan.key: note for plan, note in prepared}
    on = {"generations": phases.generations, "finetune": phases.finetune, "export_gguf": phases.export}
    steps = 1 + sum(
        (p.pairs is not None) * (1 + phases.sweep + phases.calibrate)
        + phases.layers
        + (phases.judged_sweep and p.artifact is not None)
        for p in plans
    )
    steps += sum(p.generate and (phases.generated or p.pairs is None) for p in plans) + sum(on.values())
    steps += personality_arm is not None
    context = StudyContext(model=model, judge=judge, hardware=hardware, sizes=sizes)
    runner = PhaseRunner(run, total=steps, device=context.device())
    results: dict = {
        "title": title,
        "trait": plans[0].key,
        "traits": {},
        "config": study_record(model, traits, judge, phases, hardware, sizes),
    }
    with shared_models():
        results["model"] = runner.run("model", {"model": model, "dtype": hardware.dtype}, context.hello)
        for plan in plans:
            results["traits"][plan.key] = trait_phases(runner, context, plan, notes[plan.key], phases, layer)
        results["overlap"] = trait_overlap(results["traits"], run / "overlap")
        main, why_not = main_trait(plans, results["traits"], layer, needs_artifact=phases.finetune)
        if main is not None:
            results["trait"] = main.key
            if main.key != plans[0].key:
                results["main_trait_note"] = (
                    f"{main.field} ({main.key}) took the first trait's role: {why_not}"
                )
        later_phases(runner, context, results, main, why_not, on, layer)
        if personality_arm is not None:
            results["personality_arm"] = runner.run(
                f"personality_arm_{Path(personality_arm).stem}",
                {"model": model, **context.stamp(), "trait": personality_arm},
                lambda d: context.personality_arm(d, personality_arm),
            )
    results.update(missed=runner.missed, devices=runner.devices)
    results["timings"] = {**runner.timings, "total (this invocation)": time.perf_counter() - start}
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
    if runner.missed:
        listed = "; ".join(f"{name}: {reason}" for name, reason in runner.missed.items())
        raise StudyIncomplete(
            f"the study finished with {len(runner.missed)} missed phase(s) (report: {report_path}): {listed}"
        )
    return str(report_path)


def main_trait(
    plans: list[TraitPlan], traits: dict, layer: int | None, *, needs_artifact: bool
) -> tuple[TraitPlan | None, str]:
    """The trait that gets the steered generations, the fine-tuning study and the export: the first one with a
    vector, a layer and contrastive pairs (and, for fine-tuning, eval questions); with why the earlier ones can't."""
    reasons = []
    for plan in plans:
        out = traits[plan.key]
        lacks = [
            what
            for what, ok in (
                ("vector", "vectors" in out),
                ("layer", layer is not None or "layers" in out),
                ("contrastive pairs", plan.pairs is not None),
                ("eval questions (trait artifacts)", plan.artifact is not None or not needs_artifact),
            )
            if not ok
        ]
        if not lacks:
            return plan, "; ".join(reasons)
        reasons.append(f"{plan.field} ({plan.key}) has no {' or '.join(lacks)}")
    return None, "; ".join(reasons)


def later_phases(runner, context, results: dict, main, why_not: str, on: dict, layer: int | None) -> None:
    """Steered generations, fine-tuning study and export for the main trait (missed when there is none)."""
    if main is None:
        for name in (name for name, wanted in on.items() if wanted):
            runner.skip(name, f"no trait can take the first trait's role: {why_not}")
        return
    out = results["traits"][main.key]
    vector_path = out["vectors"]["response_avg"]
    explicit_layer = layer is not None
    layer = layer if layer is not None else out["layers"]["recommended"]
    stamp = {"vectors": vector_path, "layer": layer, **context.stamp()}
    if on["generations"]:
        advice = None if explicit_layer else (out.get("calibration") or {}).get("recommended")
        results["generations"] = runner.run(
            "generations",
            {**stamp, "recommended": advice},
            lambda d: context.generations(d, vector_path, layer, advice),
        )
    if on["finetune"]:
        results["finetune"] = runner.run(
            "finetune",
            {**stamp, "trait": main.key, **source_stamp(main.pairs), "representation": True},
            lambda d: context.finetune(d, main, vector_path, layer, out.get("layers", {}).get("csv")),
        )
    if on["export_gguf"]:
        results["export"] = runner.run(
            "export_gguf", stamp, lambda d: context.export(d, main.key, vector_path, layer)
        )


def trait_overlap(traits: dict, out_dir: Path) -> dict | None:
    """Cosines between the traits' response-average vectors at every layer (overlap.csv + overlap.png): how much
    steering one trait also pushes another. None with fewer than two traits' vectors. No model pass: seconds."""
    from persona.analysis.overlap import write_overlap

    paths = {key: out["vectors"]["response_avg"] for key, out in traits.items() if out.get("vectors")}
    if len(paths) < 2:
        return None
    table = write_overlap(list(paths.values()), out_dir, names=list(paths))
    layers = {key: out.get("layers", {}).get("recommended") for key, out in traits.items() if key in paths}
    at_layers = table[table["layer"].isin([layer for layer in layers.values() if layer is not None])]
    return {
        "csv": str(out_dir / "overlap.csv"),
        "png": str(out_dir / "overlap.png"),
        "largest_abs_cosine_at_chosen_layers": None
        if at_layers.empty
        else float(at_layers["cosine"].abs().max()),
    }


def source_stamp(path: Path | None) -> dict:
    return {} if path is None else {"source": str(path), "mtime": path.stat().st_mtime}


def trait_phases(
    runner: PhaseRunner, context, plan: TraitPlan, notes: dict, phases: Phases, layer: int | None
) -> dict:
    """One trait's phases. With contrastive pairs: vectors from their train split, layer metrics on the held-out
    test split; with ``generate``: the paper's route (persona-prompted answers, judged, filtered, extracted),
    which is the vectors' only source for a trait without pairs (its layer metrics are then in-sample). A phase
    that misses leaves the later ones what exists, labelled, or skips them with the reason."""
    key, source = plan.key, plan.pairs
    stamp = {"model": context.model, **context.stamp(), **source_stamp(source)}
    out, extracted = vector_phases(runner, context, plan, notes, phases, stamp)
    wanted = [
        name
        for name, wanted in (
            ("layers", phases.layers),
            ("sweep", phases.sweep and source is not None),
            ("calibrate", phases.calibrate and source is not None and phases.layers),
            ("judged_sweep", phases.judged_sweep and plan.artifact is not None),
        )
        if wanted
    ]
    if "vectors" not in out:
        for name in wanted:
            runner.skip(f"{name}_{key}", f"no vectors for {key} (its extraction missed)")
        return out
    vector = out["vectors"]["response_avg"]
    split = "test" if plan.held_out else None
    if phases.layers:
        inputs, label = layer_inputs(plan, out.get("generated"), split)
        layers = runner.run(
            f"layers_{key}",
            {**stamp, "vectors": out["vectors"], "layer_inputs": inputs},
            lambda d: context.layers(d, vector, inputs),
        )
        if layers:
            out["layers"] = {**layers, "examples": label}
    explicit_layer = layer is not None
    layer = layer if layer is not None else out.get("layers", {}).get("recommended")
    if layer is None:
        for name in wanted[1:]:
            runner.skip(f"{name}_{key}", f"no layer for {key} (its layer metrics missed; or set layer:)")
        return out
    out.update(steering_phases(runner, context, plan, wanted, stamp, vector, layer, split,
                               layers=out.get("layers"), explicit_layer=explicit_layer))  # fmt: skip
    generated = out.get("generated")
    if generated and extracted:
        generated["cosine_with_pairs_vector"] = vector_cosine(
            generated["vectors"]["response_avg"], vector, layer
        )
        generated["layer"] = layer
    return out


def vector_phases(runner: PhaseRunner, context, plan: TraitPlan, notes: dict, phases: Phases, stamp: dict):
    """The trait's vectors: extracted from its pairs' train split, and/or by the paper's route (generated).
    Returns the trait's results so far and the extraction's (None when it did not run or missed)."""
    key, source = plan.key, plan.pairs
    out: dict = {"inputs": notes} if notes else {}
    extracted = None
    if source is not None:
        extracted = runner.run(f"extract_{key}", stamp, lambda d: context.extract(d, key, source))
        if extracted:
            out["vectors"] = extracted["vectors"]
        if not plan.held_out:
            runner.missed[f"held_out_{key}"] = notes.get("held_out", "no held-out pairs")
    if plan.generate and (phases.generated or source is None):
        generated = runner.run(
            f"generated_{key}",
            {**stamp, "artifact": plan.artifact},
            lambda d: context.generated(d, key, plan.artifact),
        )
        if generated:
            out["generated"] = generated
            out.setdefault("vectors", generated["vectors"])
            if filter_fell_back(generated):  # vectors exist, but not the filtered ones asked for
                runner.missed[f"filtered_vectors_{key}"] = generated["filter"]
    return out, extracted


def steering_phases(runner: PhaseRunner, context, plan: TraitPlan, wanted: list[str], stamp: dict, vector: str,
                    layer: int, split: str | None, *, layers: dict | None, explicit_layer: bool) -> dict:  # fmt: skip
    """Steering at the chosen layer: the judge-free sweep (likelihood), the dose calibration on the layers
    ``layers`` (the layer metrics) ranks best, and the judged sweep at the calibrated point unless ``layer:`` was
    set, as the config asks."""
    key, source, out = plan.key, plan.pairs, {}
    if "sweep" in wanted:
        sweep = runner.run(
            f"sweep_{key}",
            {**stamp, "layer": layer, "split": split},
            lambda d: context.sweep(d, key, vector, source, layer, split),
        )
        if sweep:
            out["sweep"] = sweep
    if "calibrate" in wanted and layers:
        calibrated = runner.run(
            f"calibrate_{key}",
            {**stamp, "vectors": vector, "split": split, "layers_csv": layers["csv"]},
            lambda d: context.calibrate(d, key, vector, source, split, layers["csv"], plan.artifact),
        )
        if calibrated:
            out["calibration"] = calibrated
    if "judged_sweep" in wanted:
        advice = (out.get("calibration") or {}).get("recommended") if not explicit_layer else None
        judged_layer = advice["layer"] if advice else layer
        doses = [abs(advice["dose"]) * f for f in (-1, -0.5, 0, 0.5, 1)] if advice else None
        judged = runner.run(
            f"judged_sweep_{key}",
            {**stamp, "layer": judged_layer, "artifact": plan.artifact, "doses": doses},
            lambda d: context.judged_sweep(d, plan.artifact, vector, judged_layer, doses),
        )
        if judged:
            out["judged_sweep"] = judged
    return out


def layer_inputs(plan: TraitPlan, generated: dict | None, split: str | None) -> tuple[dict, str]:
    """What the layer metrics read, and how the report labels it: held-out pairs, every pair (no held-out
    split), or the generation route's judged answers as its extraction used them (filtered or not)."""
    if plan.pairs is not None:
        label = "held-out pairs" if split else "all pairs, in-sample (no held-out split)"
        return {"pairs_path": str(plan.pairs), "split": split}, label
    filtered = generated.get("filtered", True)
    inputs = {"pos_path": generated["pos_csv"], "neg_path": generated["neg_csv"], "no_filter": not filtered}
    if filtered:
        inputs["threshold"] = generated.get("threshold", 50)
    why = "the filter kept no pair" if filter_fell_back(generated) else "no filter asked"
    label = "judged answers, in-sample, " + (
        "filtered as for extraction" if filtered else f"unfiltered ({why})"
    )
    return inputs, label


def filter_fell_back(generated: dict) -> bool:
    """The generation route asked for the seed's filter, which kept no pair (so its vectors are unfiltered)."""
    return generated.get("threshold", 50) is not None and not generated.get("filtered", True)


def vector_cosine(a: str, b: str, layer: int) -> float:
    import torch

    from persona.vectors import load_vector

    return float(torch.nn.functional.cosine_similarity(load_vector(a)[layer], load_vector(b)[layer], dim=0))


def study_record(model, traits, judge, phases, hardware, sizes) -> dict:
    """The settings as they go into results.json (the judge's key never does: it lives in the environment)."""
    return {
        "model": model,
        "traits": [t if isinstance(t, str) else asdict(t) for t in traits],
        "judge": asdict(judge),
        "phases": asdict(phases),
        "hardware": asdict(hardware),
        "sizes": asdict(sizes),
    }
