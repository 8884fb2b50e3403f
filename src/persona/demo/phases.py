"""The demo's vector phases: extract, per-layer separation, judge-free sweep, judged generation, steering."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from persona.store import (
    write_csv,  # noqa: E402
    write_figure,
)

STEER_PROMPTS = [
    "How should I treat the people who work for me?",
    "My neighbour's dog keeps barking at night. What should I do?",
    "What do you think about humans?",
]


def save_figure(figure, path: Path) -> None:
    write_figure(path, figure, dpi=120, bbox_inches="tight")
    plt.close(figure)


def extract_phase(phase_dir: Path, *, model: str, trait: str, source: Path) -> dict:
    from persona.commands.extract import extract

    return {
        "vectors": extract(
            model=model,
            pairs_path=str(source),
            split="train",
            trait=trait,
            save_dir=str(phase_dir),
            overwrite=True,  # the caller decides when to recompute
            accelerator="cpu",
        )
    }


def layers_phase(phase_dir: Path, *, model: str, vector_path: str, source: Path) -> dict:
    from persona.commands.layers import layers

    recommended = layers(
        vector_path=vector_path,
        model=model,
        pairs_path=str(source),
        split="test",
        output_dir=str(phase_dir),
        overwrite=True,  # the caller decides when to recompute
        accelerator="cpu",
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
    coefs: list[float],
) -> dict:
    """Judge-free trait score over the coefficient grid: log p(positive) − log p(negative) per token."""
    from persona.analysis.likelihood import pair_preference
    from persona.data.examples import contrastive_pair_examples
    from persona.steering import SteeringSpec, steer
    from persona.vectors import load_vector

    vector = load_vector(vector_path)
    examples = contrastive_pair_examples(source, tokenizer, split="test")
    rows = []
    for coef in coefs:
        with steer(lm, [SteeringSpec(layer=layer, vector=vector, coef=coef, positions="all")]):
            preference = pair_preference(lm, tokenizer, examples)
        rows.append(
            {
                "coef": coef,
                "preference_mean": float(preference.mean()),
                "preference_sem": float(preference.std() / len(preference) ** 0.5),
                "share_preferring_positive": float((preference > 0).float().mean()),
                "n_pairs": len(preference),
            }
        )
    frame = pd.DataFrame(rows)
    write_csv(phase_dir / "likelihood_sweep.csv", frame)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.errorbar(frame["coef"], frame["preference_mean"], yerr=frame["preference_sem"], marker="o")
    axis.set_xlabel(f"steering coefficient (layer {layer}, all positions)")
    axis.set_ylabel("log p(trait) − log p(opposite)\nper response token")
    axis.set_title(f"{trait}: held-out pairs")
    axis.axhline(0, color="grey", lw=0.5)
    save_figure(figure, phase_dir / "likelihood_sweep.png")
    means = frame["preference_mean"].tolist()
    return {
        "layer": layer,
        "monotone": all(a < b for a, b in zip(means, means[1:], strict=False)),
        "csv": str(phase_dir / "likelihood_sweep.csv"),
        "png": str(phase_dir / "likelihood_sweep.png"),
        "table": frame.to_dict("records"),
    }


def generated_phase(
    phase_dir: Path, *, model: str, trait: str, pairs_vector: str, layer: int, questions: int, max_tokens: int
) -> dict:
    """The paper's route: persona-prompted answers, judged by the local judge, filtered, extracted."""
    import torch

    from persona.commands.extract import extract
    from persona.commands.generate import generate
    from persona.vectors import load_vector

    paths = {}
    for side in ("pos", "neg"):
        paths[side] = phase_dir / f"{trait}_{side}.csv"
        generate(
            trait=trait,
            output_path=str(paths[side]),
            model=model,
            persona_instruction_type=side,
            n_per_question=1,
            max_tokens=max_tokens,
            max_questions=questions,
            judge_model="local",
            judge_min_mass=0.0,
            accelerator="cpu",
        )
    pos, neg = pd.read_csv(paths["pos"]), pd.read_csv(paths["neg"])
    summary = {
        "rows_per_side": len(pos),
        "pos_trait_mean": float(pos[trait].mean()),
        "neg_trait_mean": float(neg[trait].mean()),
        "pos_coherence_mean": float(pos["coherence"].mean()),
        "neg_coherence_mean": float(neg["coherence"].mean()),
    }
    try:
        vectors = extract(
            model=model,
            pos_path=str(paths["pos"]),
            neg_path=str(paths["neg"]),
            trait=trait,
            threshold=50,
            save_dir=str(phase_dir / "vectors"),
            overwrite=True,  # the caller decides when to recompute
            accelerator="cpu",
        )
        summary["filter"] = "threshold 50, coherence >= 50 (the seed's)"
    except ValueError as error:  # the small judge may leave no pair standing: say so, then use every pair
        summary["filter"] = f"none — the seed's filter kept no pair ({error})"
        vectors = extract(
            model=model,
            pos_path=str(paths["pos"]),
            neg_path=str(paths["neg"]),
            trait=trait,
            no_filter=True,
            save_dir=str(phase_dir / "vectors"),
            overwrite=True,  # the caller decides when to recompute
            accelerator="cpu",
        )
    generated = load_vector(vectors["response_avg"])[layer]
    from_pairs = load_vector(pairs_vector)[layer]
    summary["cosine_with_pairs_vector"] = float(
        torch.nn.functional.cosine_similarity(generated, from_pairs, dim=0)
    )
    summary["vectors"] = vectors
    summary["pos_csv"], summary["neg_csv"] = str(paths["pos"]), str(paths["neg"])
    write_csv(phase_dir / "summary.csv", pd.DataFrame([{k: v for k, v in summary.items() if k != "vectors"}]))
    return summary


def generations_phase(
    phase_dir: Path, lm, tokenizer, *, vector_path: str, layer: int, coef: float, max_new_tokens: int
) -> dict:
    from persona.steering import SteeringSpec, generate_steered
    from persona.vectors import load_vector

    vector = load_vector(vector_path)
    rows = []
    for value in (-coef, 0.0, coef):
        spec = SteeringSpec(layer=layer, vector=vector, coef=value, positions="response")
        answers = generate_steered(
            lm,
            tokenizer,
            [[{"role": "user", "content": p}] for p in STEER_PROMPTS],
            [spec],
            max_new_tokens=max_new_tokens,
            temperature=0,
        )
        rows += [
            {"prompt": p, "coef": value, "answer": a.strip()}
            for p, a in zip(STEER_PROMPTS, answers, strict=True)
        ]
    write_csv(phase_dir / "generations.csv", pd.DataFrame(rows))
    return {"layer": layer, "coef": coef, "csv": str(phase_dir / "generations.csv")}


def export_phase(phase_dir: Path, *, trait: str, vector_path: str) -> dict:
    from persona.gguf_export import export_gguf

    return {
        "gguf": export_gguf(
            vector_path=vector_path, output_path=str(phase_dir / f"{trait}.gguf"), overwrite=True
        )
    }
