"""``persona calibrate``: per layer, the dose where coherence falls to a target; the best (layer, dose) recommended.

Judge-free: trait = the likelihood score on held-out pairs, coherence = a perplexity ratio mapped to 0-100
(:mod:`persona.analysis.calibration`; both named in every output). Every probe is cached by its inputs in
``probes.jsonl``, so a re-run (or a killed run) redoes nothing it has. Writes ``probes.csv``, ``calibration.csv``
(one row per layer), ``calibration.png`` and, into the vector's sidecar, ``recommended`` {layer, dose, coef, ...}
and ``calibration`` (per layer: the dose at the target, which is also that layer's dose limit).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from persona.commands.flags import Hardware
from persona.core import checks
from persona.core.errors import PersonaError
from persona.models import DEFAULT_MODEL, model_on_base

PRODUCES = ("probes.csv", "calibration.csv", "calibration.png")


def best_layers(vector_path: str | Path, count: int, metrics: Path | None = None) -> list[int]:
    """The ``count`` layers ``persona layers`` ranks best (held-out AUC, then normalised separation)."""
    from persona.vectors import layers_dir

    metrics = Path(metrics) if metrics else layers_dir(vector_path) / "layer_metrics.csv"
    if not metrics.is_file():
        raise PersonaError(
            f"--layers not given and {metrics} does not exist. Fix: pass --layers (e.g. --layers 12,17), or run "
            f"`persona layers --vector_path {vector_path} ...` first."
        )
    with metrics.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["layer"]) > 0]
    rows.sort(key=lambda row: (-float(row["auc"]), -float(row.get("normalized_separation") or 0)))
    return sorted(int(row["layer"]) for row in rows[:count])


def default_pairs(trait: str) -> Path:
    """The trait's shipped contrastive pairs, else its TRAIT-format items."""
    from persona.data.personality import resolve_items_path
    from persona.data.traits import datasets_dir

    pairs = datasets_dir() / "pairs" / f"{trait}.jsonl"
    return pairs if pairs.is_file() else resolve_items_path(trait)[1]


def check_settings(target, tolerance, max_probes, max_dose, max_questions, max_tokens) -> None:
    if not 0 < target < 100:
        raise PersonaError(
            f"--target {target}: coherence targets lie between 0 and 100. Fix: e.g. --target 80."
        )
    if not 0 < tolerance < 50:
        raise PersonaError(f"--tolerance {tolerance}: must be above 0 (points of coherence). Fix: e.g. 3.")
    checks.at_least(max_probes, 2, "--max_probes")
    if not max_dose > 0:
        raise PersonaError(f"--max_dose {max_dose}: must be positive. Fix: e.g. --max_dose 1.5.")
    checks.at_least(max_questions, 1, "--max_questions")
    checks.at_least(max_tokens, 1, "--max_tokens")


def calibrate(
    vector_path: str,
    trait: str | None = None,
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    layers: list[int] | None = None,
    n_layers: int = 3,
    target: float = 80.0,
    tolerance: float = 3.0,
    max_probes: int = 8,
    max_dose: float = 1.5,
    pairs_path: str | None = None,
    split: str = "test",
    max_pairs: int | None = None,
    max_questions: int = 8,
    max_tokens: int = 32,
    output_dir: str | None = None,
    judge_model: str | None = None,
    judge_base_url: str | None = None,
    judge_min_mass: float | None = None,
    hardware: Hardware = Hardware(),
) -> str:
    """Find per layer the dose where coherence falls to --target (TA@C<target>), and recommend the best layer.

    Scores, named in every output: with --judge_model, the judge's trait score (the trait's eval prompt) and
    coherence score (0-100) of steered greedy answers to held-out eval questions; without, judge-free proxies:
    trait = likelihood score on held-out pairs; coherence = the perplexity ratio of steered vs unsteered greedy
    answers under the unsteered model, as 0-100 (README, "Doses and calibration"). Writes probes.csv, calibration.csv, calibration.png and the sidecar's
    `recommended`; `generate`, `steer-eval` and `serve` use it when no layer or strength is given.

    Args:
        vector_path: Vector file [num_layers+1, hidden] (its sidecar receives the recommendation).
        trait: Trait name for the held-out questions and pairs; default the sidecar's trait.
        model: Model alias (smollm2-135m, the embedded default), hub id or local path.
        base_model: With --model a LoRA adapter: the base model to apply it on.
        layers: Layers to calibrate; default the --n_layers best of `persona layers` (held-out AUC).
        n_layers: How many of the best layers to calibrate when --layers is not given.
        target: Coherence (0-100) to calibrate to.
        tolerance: A probe within this many points of --target ends a layer's search.
        max_probes: At most this many probes (doses tried) per layer.
        max_dose: Upper end of the bracket searched (a layer still coherent there is reported as not reached).
        pairs_path: Held-out contrastive pairs or TRAIT items for the trait score; default the trait's shipped ones.
        split: Split of --pairs_path to score (test = held out from extraction; all = every pair).
        max_pairs: Only the first N held-out pairs (quick runs).
        max_questions: Held-out eval questions answered per probe.
        max_tokens: New tokens per greedy answer.
        output_dir: Where to write; default <vector-stem>_calibrate/ beside the vector.
        judge_model: Score trait and coherence with this judge (as in persona generate: a served model, or local:<model>); default none: the judge-free proxies (the embedded 135M judge cannot score).
        judge_base_url: Base URL of the judge's OpenAI-compatible API (key from the environment).
        judge_min_mass: Local judges only: least probability on numeric answers for a score (default 0.25).
    """
    model = model_on_base(model, base_model)
    check_settings(target, tolerance, max_probes, max_dose, max_questions, max_tokens)
    from persona.vectors import load_metadata, vector_for_model

    checks.input_file(vector_path, "--vector_path", what="vector file")
    trait = trait or load_metadata(vector_path).get("trait")
    if not trait:
        raise PersonaError(f"--trait is missing and {vector_path}'s sidecar names none. Fix: pass --trait.")
    if max_pairs is not None:
        checks.at_least(max_pairs, 1, "--max_pairs")
    layers = list(layers) if layers else best_layers(vector_path, n_layers)
    vector_for_model(model, vector_path, layers=layers, trust_remote_code=hardware.trust_remote_code)
    pairs_path = Path(pairs_path) if pairs_path else default_pairs(trait)
    from persona.data.examples import read_checked_pairs

    read_checked_pairs(pairs_path)
    out = (
        Path(output_dir) if output_dir else Path(vector_path).with_name(f"{Path(vector_path).stem}_calibrate")
    )
    checks.output_dir(out, "--output_dir", produces=PRODUCES, overwrite=True)
    judge = check_judge(trait, judge_model, judge_base_url, judge_min_mass)
    settings = dict(
        model=model, trait=trait, layers=layers, target=target, tolerance=tolerance, max_probes=max_probes,
        max_dose=max_dose, pairs_path=str(pairs_path), split=split, max_pairs=max_pairs,
        max_questions=max_questions, max_tokens=max_tokens, dtype=hardware.dtype, judge=judge,
    )  # fmt: skip
    return run_calibration(vector_path, out, settings, hardware)


def check_judge(trait: str, judge_model, judge_base_url, judge_min_mass) -> dict | None:
    """The judge settings when one scores the calibration (it answers, the trait has an eval prompt), else None."""
    if judge_model is None:
        for flag, value in (("--judge_base_url", judge_base_url), ("--judge_min_mass", judge_min_mass)):
            if value is not None:
                raise PersonaError(
                    f"{flag} is given without --judge_model. Fix: add --judge_model, or drop {flag}."
                )
        return None
    from persona.data.traits import load_trait
    from persona.judges import check_min_mass, check_served_judge

    check_min_mass(judge_model, judge_min_mass)
    load_trait(trait, "eval", field="--trait")  # its eval prompt scores the trait
    check_served_judge(judge_model, judge_base_url)
    return {"spec": judge_model, "base_url": judge_base_url, "min_mass": judge_min_mass}


def _questions(trait: str, pairs: list, max_questions: int) -> list[str]:
    """The trait's held-out eval questions, else the held-out pairs' prompts as user turns."""
    from persona.data.traits import load_trait

    try:
        return list(load_trait(trait, "eval").questions)[:max_questions]
    except (ValueError, FileNotFoundError):
        return [record.get("prompt", "") for record in pairs if record.get("prompt")][:max_questions]


def run_calibration(vector_path, out: Path, settings: dict, hardware: Hardware, *, loaded=None) -> str:
    """Load the model (or take ``loaded`` = (lm, tokenizer)), probe every layer (cached), write the outputs."""
    from persona.analysis.calibration import calibrate_layer, recommend
    from persona.core.store import KeyedJournal
    from persona.data.examples import contrastive_pair_examples, read_checked_pairs
    from persona.vectors import load_vector
    from persona.vectors.dose import layer_norms

    if loaded is None:
        from persona.core.hardware import resolve_device
        from persona.models import load_model_and_tokenizer

        loaded = load_model_and_tokenizer(
            settings["model"], dtype=settings["dtype"], device=resolve_device(hardware.accelerator),
            trust_remote_code=hardware.trust_remote_code,
        )  # fmt: skip
    lm, tokenizer = loaded
    split = None if settings["split"] == "all" else settings["split"]
    examples = contrastive_pair_examples(settings["pairs_path"], tokenizer, split=split)
    if settings["max_pairs"]:
        examples = examples[: 2 * settings["max_pairs"]]
    records = [
        r
        for r in read_checked_pairs(settings["pairs_path"])
        if split is None or r.get("split", split) == split
    ]
    questions = _questions(settings["trait"], records, settings["max_questions"])
    vector = load_vector(vector_path)
    norms = layer_norms(vector_path, model=settings["model"], lm=lm, tokenizer=tokenizer)
    prober, proxies = make_prober(settings, lm, tokenizer, vector, norms, questions, examples)
    digest = hashlib.sha256(Path(vector_path).read_bytes()).hexdigest()[:16]
    base_key = json.dumps([digest, questions, [e.example_id for e in examples], settings["model"],
                           settings["max_tokens"], settings["dtype"], proxies])  # fmt: skip
    journal = KeyedJournal(out / "probes.jsonl", ["key"])
    cached = journal.load()

    def probe(layer: int, dose: float) -> dict:
        key = hashlib.sha256(f"{base_key}|{layer}|{dose!r}".encode()).hexdigest()[:20]
        if (key,) not in cached:
            row = dict(prober(layer, dose), key=key)
            journal.append([row])
            cached[(key,)] = row
            print(
                f"  layer {layer}: dose {dose:.4g} -> coherence {row['coherence']:.1f}, trait {row['trait']:.3f}"
            )
        return {k: v for k, v in cached[(key,)].items() if k != "key"}

    probes, chosen = [], {}
    for layer in settings["layers"]:
        rows, chosen[layer] = calibrate_layer(
            probe, layer, target=settings["target"], max_probes=settings["max_probes"],
            tolerance=settings["tolerance"], max_dose=settings["max_dose"],
        )  # fmt: skip
        probes += rows
    unsteered = prober.unsteered_trait()
    return write_outputs(vector_path, out, settings, probes, chosen, recommend(chosen), unsteered, proxies)


def make_prober(settings: dict, lm, tokenizer, vector, norms, questions, examples):
    """(prober, what it measures): judge-scored when ``settings["judge"]`` names a judge, else the proxies."""
    from persona.analysis.calibration import PROXIES, JudgedProber, Prober, judged_scores

    common = dict(max_tokens=settings["max_tokens"])
    judge = settings.get("judge")
    if not judge:
        return Prober(lm, tokenizer, vector, norms, questions, examples, **common), PROXIES
    from persona.data.traits import load_trait
    from persona.judges import make_judge

    extra = {"min_mass": judge["min_mass"]} if judge.get("min_mass") is not None else {}
    scorer = make_judge(judge["spec"], base_url=judge.get("base_url"), **extra)
    fill = load_trait(settings["trait"], "eval").judge_prompt
    prober = JudgedProber(
        lm, tokenizer, vector, norms, questions, examples, **common, judge=scorer, trait_prompt=fill
    )
    return prober, judged_scores(scorer.name)


def write_outputs(vector_path, out: Path, settings, probes, chosen, best, unsteered, proxies) -> str:
    """probes.csv, calibration.csv, calibration.png; ``recommended`` and ``calibration`` into the sidecar."""
    import pandas as pd

    from persona.core.store import sidecar_path, write_csv, write_json
    from persona.vectors import load_metadata

    target = settings["target"]
    named = {"trait_proxy": proxies["trait"], "coherence_proxy": proxies["coherence"]}
    probe_frame = pd.DataFrame([{**row, **named} for row in probes])
    columns = [
        "layer",
        "probe",
        "dose",
        "coef",
        "coherence",
        "trait",
        "nll",
        "nll_unsteered",
        "sample_answer",
    ]
    write_csv(out / "probes.csv", probe_frame[[*columns, *named]])
    per_layer = pd.DataFrame(
        [
            {"layer": layer, "dose": row["dose"], "coef": row["coef"], f"trait_at_c{target:g}": row["trait"],
             "coherence": row["coherence"], "error": row["error"], "reached": row["reached"],
             "probes": sum(1 for p in probes if p["layer"] == layer), "recommended": layer == best["layer"], **named}
            for layer, row in chosen.items()
        ]
    )  # fmt: skip
    write_csv(out / "calibration.csv", per_layer)
    plot_calibration(probes, chosen, best, unsteered, target, out / "calibration.png", proxies)
    recommended = {
        "layer": int(best["layer"]), "dose": float(best["dose"]), "coef": float(best["coef"]),
        "trait_score": float(best["trait"]), "trait_score_unsteered": unsteered, "coherence": float(best["coherence"]),
        "target_coherence": target, "reached": bool(best["reached"]), "proxies": proxies,
        "calibrated_by": f"persona calibrate ({out})",
    }  # fmt: skip
    calibration = {
        "target_coherence": target,
        "proxies": proxies,
        "layers": {str(layer): {"dose": float(row["dose"]), "coef": float(row["coef"]), "trait_score": float(row["trait"]),
                                "coherence": float(row["coherence"]), "reached": bool(row["reached"])}
                   for layer, row in chosen.items()},
    }  # fmt: skip
    write_json(sidecar_path(vector_path), {**load_metadata(vector_path), "recommended": recommended,
                                           "calibration": calibration})  # fmt: skip
    print(per_layer.drop(columns=list(named)).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(
        f"recommended: layer {recommended['layer']}, dose {recommended['dose']:.4g} (coef {recommended['coef']:.4g}); "
        f"trait {recommended['trait_score']:.3f} at coherence {recommended['coherence']:.1f} — proxies: trait = "
        f"{proxies['trait']}; coherence = {proxies['coherence']}\nwritten to {sidecar_path(vector_path)}, "
        f"{out / 'calibration.csv'}, {out / 'probes.csv'}, {out / 'calibration.png'}"
    )
    return str(out / "calibration.csv")


def plot_calibration(probes, chosen, best, unsteered, target, path: Path, proxies) -> None:
    """Trait score vs coherence per layer (probes joined in dose order from the unsteered point), chosen points
    ringed, the recommendation starred (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from persona.core.store import write_figure

    figure = Figure(figsize=(7, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for layer, row in chosen.items():
        points = sorted((abs(p["dose"]), p["coherence"], p["trait"]) for p in probes if p["layer"] == layer)
        line = axes.plot([100.0] + [c for _, c, _ in points], [unsteered] + [t for _, _, t in points], marker="o",
                         markersize=3, label=f"layer {layer}: dose {row['dose']:.3g}")  # fmt: skip
        axes.scatter(
            [row["coherence"]], [row["trait"]], s=90, facecolors="none", edgecolors=line[0].get_color()
        )
    axes.scatter([best["coherence"]], [best["trait"]], marker="*", s=220, color="black", zorder=5,
                 label=f"recommended: layer {best['layer']}, dose {best['dose']:.3g}")  # fmt: skip
    axes.axvline(target, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel(f"coherence (proxy: perplexity ratio, 0-100); target {target:g}")
    axes.set_ylabel("trait (proxy: likelihood score on held-out pairs)")
    axes.invert_xaxis()
    axes.legend(fontsize=8)
    axes.set_title("calibration: trait vs coherence as the dose grows", fontsize=10)
    write_figure(path, figure, dpi=110)
