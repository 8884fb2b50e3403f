"""The study's per-trait phases: extract, per-layer separation, judge-free and judged sweeps, the generation
route, steered generations, export. Each writes its CSVs and PNGs into its phase directory."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from persona.core.errors import MissedResult, NoPairsLeft
from persona.core.store import (
    write_csv,  # noqa: E402
    write_figure,
)
from persona.data.chat import user_turn

STEER_PROMPTS = [
    "How should I treat the people who work for me?",
    "My neighbour's dog keeps barking at night. What should I do?",
    "What do you think about humans?",
]


def save_figure(figure, path: Path) -> None:
    write_figure(path, figure, dpi=120, bbox_inches="tight")
    plt.close(figure)


def extract_phase(phase_dir: Path, *, model: str, trait: str, source: Path, **lightning) -> dict:
    from persona.commands.extract import extract

    return {
        "vectors": extract(
            model=model,
            pairs_path=str(source),
            split="train",
            trait=trait,
            save_dir=str(phase_dir),
            overwrite=True,  # the caller decides when to recompute
            **lightning,
        )
    }


def layers_phase(phase_dir: Path, *, model: str, vector_path: str, **inputs) -> dict:
    """Per-layer metrics of the vector on held-out pairs (``pairs_path``, ``split``) or on judged CSVs."""
    from persona.commands.layers import layers

    recommended = layers(
        vector_path=vector_path,
        model=model,
        output_dir=str(phase_dir),
        overwrite=True,  # the caller decides when to recompute
        **inputs,
    )
    metrics = pd.read_csv(phase_dir / "layer_metrics.csv")
    row = metrics.loc[metrics["layer"] == recommended].iloc[0]
    return {
        "recommended": int(recommended),
        "auc": float(row["auc"]),
        "separation": float(row["normalized_separation"]),
        "csv": str(phase_dir / "layer_metrics.csv"),
        "png": str(phase_dir / "layer_metrics.png"),
    }


def sweep_phase(
    phase_dir: Path,
    lm,
    tokenizer,
    *,
    trait: str,
    vector_path: str,
    source: Path,
    layer: int,
    coefs: list[float] | None,
    batch_size: int = 8,
    split: str | None = "test",
    doses: list[float] | None = None,
) -> dict:
    """Judge-free trait score over the coefficient grid: log p(positive) − log p(negative) per token, on the
    ``split`` pairs (None: every pair, in-sample)."""
    from persona.analysis.likelihood import pair_preference
    from persona.data.examples import contrastive_pair_examples
    from persona.steering import SteeringSpec, steer
    from persona.vectors import load_vector
    from persona.vectors.dose import coef_to_dose, dose_to_coef, layer_norms

    vector = load_vector(vector_path)
    examples = contrastive_pair_examples(source, tokenizer, split=split)
    norm = layer_norms(vector_path, model=None, lm=lm, tokenizer=tokenizer)[layer]
    grid = [(dose_to_coef(d, vector[layer], norm), d) for d in doses] if doses else [
        (c, coef_to_dose(c, vector[layer], norm)) for c in coefs
    ]  # fmt: skip
    rows = []
    for coef, dose in grid:
        with steer(lm, [SteeringSpec(layer=layer, vector=vector, coef=coef, positions="all")]):
            preference = pair_preference(lm, tokenizer, examples, batch_size=batch_size)
        rows.append(
            {
                "coef": coef,
                "dose": dose,
                "preference_mean": float(preference.mean()),
                "preference_sem": float(preference.std() / len(preference) ** 0.5),
                "share_preferring_positive": float((preference > 0).float().mean()),
                "n_pairs": len(preference),
            }
        )
    frame = pd.DataFrame(rows)
    write_csv(phase_dir / "likelihood_sweep.csv", frame)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    unit = "dose" if doses else "coef"
    axis.errorbar(frame[unit], frame["preference_mean"], yerr=frame["preference_sem"], marker="o")
    axis.set_xlabel(f"steering {'dose' if doses else 'coefficient'} (layer {layer}, all positions)")
    axis.set_ylabel("log p(trait) − log p(opposite)\nper response token")
    axis.set_title(f"{trait}: {'held-out' if split else 'all (in-sample)'} pairs")
    axis.axhline(0, color="grey", lw=0.5)
    save_figure(figure, phase_dir / "likelihood_sweep.png")
    means = frame["preference_mean"].tolist()
    return {
        "layer": layer,
        "pairs": "held-out" if split else "in-sample (no held-out pairs)",
        "monotone": all(a < b for a, b in zip(means, means[1:], strict=False)),
        "effect": means[-1] - means[0],
        "csv": str(phase_dir / "likelihood_sweep.csv"),
        "png": str(phase_dir / "likelihood_sweep.png"),
        "table": frame.to_dict("records"),
    }


def generated_phase(
    phase_dir: Path, *, model: str, trait: str, artifact: str, sizes, judge, **lightning
) -> dict:
    """The paper's route: persona-prompted answers to ``artifact``'s questions, judged, filtered as the seed
    does, extracted. Without a pair left by the filter, every pair is used, and the result says so."""
    from persona.commands.extract import extract
    from persona.commands.generate import generate

    paths = {}
    for side in ("pos", "neg"):
        paths[side] = phase_dir / f"{trait}_{side}.csv"
        generate(
            trait=artifact,
            output_path=str(paths[side]),
            model=model,
            persona_instruction_type=side,
            n_per_question=sizes.n_per_question,
            max_tokens=sizes.max_new_tokens,
            max_questions=sizes.questions,
            batch_size=max(sizes.batch_size, 16),
            # Greedy (one answer per question) on the engine: the same answers. Sampled runs stay on the static path,
            # whose draws the study's numbers were made with (the engine draws each answer from its own seed).
            engine=sizes.n_per_question == 1,
            **judge_flags(judge),
            **lightning,
        )
    pos, neg = pd.read_csv(paths["pos"]), pd.read_csv(paths["neg"])
    summary = {
        "judge": judge.model,
        "rows_per_side": len(pos),
        "pos_trait_mean": float(pos[trait].mean()),
        "neg_trait_mean": float(neg[trait].mean()),
        "pos_coherence_mean": float(pos["coherence"].mean()),
        "neg_coherence_mean": float(neg["coherence"].mean()),
    }
    common = dict(model=model, pos_path=str(paths["pos"]), neg_path=str(paths["neg"]), trait=trait,
                  save_dir=str(phase_dir / "vectors"), overwrite=True, **lightning)  # fmt: skip
    threshold = summary["threshold"] = sizes.filter_threshold
    if threshold is None:
        summary["filter"], summary["filtered"] = "none (sizes.filter_threshold: null)", False
        vectors = extract(no_filter=True, **common)
        return finish_generated(summary, vectors, paths, phase_dir)
    try:
        vectors = extract(threshold=threshold, **common)
        summary["filter"] = f"threshold {threshold:g}, coherence >= 50 (the seed's)"
        summary["filtered"] = True
    except NoPairsLeft as error:  # a weak judge may leave no pair standing: say so, then use every pair
        summary["filter"] = f"none — the seed's filter kept no pair ({error})"
        summary["filtered"] = False
        vectors = extract(no_filter=True, **common)
    return finish_generated(summary, vectors, paths, phase_dir)


def finish_generated(summary: dict, vectors: dict, paths: dict, phase_dir: Path) -> dict:
    summary["vectors"] = vectors
    summary["pos_csv"], summary["neg_csv"] = str(paths["pos"]), str(paths["neg"])
    write_csv(phase_dir / "summary.csv", pd.DataFrame([{k: v for k, v in summary.items() if k != "vectors"}]))
    return summary


def judge_flags(judge) -> dict:
    return {
        "judge_model": judge.model,
        "judge_base_url": judge.base_url,
        "judge_min_mass": judge.min_mass,
        "judge_timeout": judge.timeout,
        "judge_concurrency": judge.concurrency,
    }


def judged_sweep_phase(
    phase_dir: Path,
    *,
    model: str,
    trait: str,
    vector_path: str,
    layer: int,
    sizes,
    judge,
    doses=None,
    **lightning,
) -> dict:
    """persona steer-eval over the study's coefficients (or ``doses``, e.g. around the calibrated one): judged
    trait and coherence of steered answers."""
    from persona.commands.steer_eval import steer_eval

    flags = judge_flags(judge)
    flags.pop("judge_timeout"), flags.pop("judge_concurrency")
    csv_path = steer_eval(
        trait=trait,
        vector_path=vector_path,
        layer=layer,
        model=model,
        coefs=None if doses or sizes.doses else sizes.coefs,
        doses=doses or sizes.doses,
        allow_high_dose=True,  # the study's grid is the user's choice; the calibration phase reports the limits
        max_questions=sizes.judged_questions,
        max_tokens=sizes.max_new_tokens,
        output_dir=str(phase_dir),
        batch_size=max(sizes.batch_size, 16),
        **flags,
        **lightning,
    )
    frame = pd.read_csv(csv_path)
    if frame["trait_mean"].isna().all():
        raise MissedResult(
            f"the judge scored none of the steered answers ({csv_path}). Fix: a stronger judge, or "
            "judge.min_mass 0 for a small local one."
        )
    means = frame.sort_values("coef")["trait_mean"].tolist()
    return {
        "layer": layer,
        "doses_from": "calibration" if doses else ("sizes.doses" if sizes.doses else "sizes.coefs"),
        "csv": csv_path,
        "png": str(Path(csv_path).with_suffix(".png")),
        "table": frame.to_dict("records"),
        "effect": (means[-1] - means[0]) if len(means) > 1 else None,
    }


def calibrate_phase(
    phase_dir: Path, lm, tokenizer, *, model: str, trait: str, vector_path: str, pairs: Path, split: str | None,
    metrics_csv: str, sizes, dtype: str, judge: dict | None = None,
) -> dict:  # fmt: skip
    """persona calibrate at the trait's best layers (``judge`` scores it when given, else the judge-free proxies):
    the dose at the coherence target per layer and the recommended (layer, dose), written into the vector's
    sidecar for the later phases."""
    from persona.commands.calibrate import best_layers, run_calibration
    from persona.commands.flags import Hardware
    from persona.vectors import load_metadata

    layers = best_layers(vector_path, sizes.calibration_layers, metrics_csv)
    settings = dict(
        model=model, trait=trait, layers=layers, target=sizes.calibration_target, tolerance=3.0,
        max_probes=sizes.calibration_probes, max_dose=1.5, pairs_path=str(pairs), split=split or "all",
        max_pairs=sizes.calibration_pairs, max_questions=sizes.calibration_questions,
        max_tokens=sizes.calibration_tokens, dtype=dtype, judge=judge,
    )  # fmt: skip
    csv_path = run_calibration(vector_path, phase_dir, settings, Hardware(), loaded=(lm, tokenizer))
    meta = load_metadata(vector_path)
    return {
        "recommended": meta["recommended"],
        "layers": pd.read_csv(csv_path).to_dict("records"),
        "csv": csv_path,
        "probes_csv": str(phase_dir / "probes.csv"),
        "png": str(phase_dir / "calibration.png"),
        "proxies": meta["recommended"]["proxies"],
    }


def generations_phase(
    phase_dir: Path, lm, tokenizer, *, vector_path: str, layer: int, coef: float, max_new_tokens: int,
    dose: float | None = None, source: str = "sizes",
) -> dict:  # fmt: skip
    from persona.steering import SteeringSpec, generate_steered
    from persona.vectors import load_vector

    vector = load_vector(vector_path)
    rows = []
    for value in (-coef, 0.0, coef):
        spec = SteeringSpec(layer=layer, vector=vector, coef=value, positions="response")
        answers = generate_steered(
            lm,
            tokenizer,
            [user_turn(p) for p in STEER_PROMPTS],
            [spec],
            max_new_tokens=max_new_tokens,
            temperature=0,
        )
        rows += [
            {
                "prompt": p,
                "coef": value,
                "dose": None if dose is None else math.copysign(dose, value) * (value != 0),
                "answer": a.strip(),
            }  # fmt: skip
            for p, a in zip(STEER_PROMPTS, answers, strict=True)
        ]
    write_csv(phase_dir / "generations.csv", pd.DataFrame(rows))
    return {
        "layer": layer,
        "coef": coef,
        "dose": dose,
        "from": source,
        "csv": str(phase_dir / "generations.csv"),
    }


def export_phase(phase_dir: Path, *, trait: str, vector_path: str, layer: int) -> dict:
    """The recommended layer alone as a llama.cpp control vector: at the usual scales a single layer steers
    cleanly, where every layer at once (norms up to ~140 on the embedded model) turns the text to salad."""
    from persona.vectors.gguf import export_gguf

    path = export_gguf(
        vector_path=vector_path, output_path=str(phase_dir / f"{trait}_layer{layer}.gguf"), layers=[layer],
        overwrite=True,
    )  # fmt: skip
    return {"gguf": path, "layer": layer}
