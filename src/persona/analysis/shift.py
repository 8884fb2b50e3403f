"""Finetuning shift along a persona vector, and how well it predicts the trait after fine-tuning (paper §5).

The shift of a fine-tuned model is its mean activation at layer L minus the base model's, projected on
the unit persona vector, over the trait's evaluation prompts (chat-formatted questions, no system
prompt):

- ``shift_prompt_last``: at the last prompt token (the paper's measure);
- ``shift_response_avg``: averaged over response tokens of the *base* model's greedy responses to the
  same prompts (generated once, cached in the output folder), teacher-forced through both models.

Projection is linear, so the projection of the difference of means equals the difference of the
means of per-example projections; the code computes the latter. Against it stands each model's trait
score — ``likelihood`` (offline: mean pair preference on the trait's held-out pairs) or ``judge`` — and
the Pearson r between shift and trait-score change over the fine-tuned models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from persona.core.hardware import release_memory, resolve_device
from persona.core.store import write_figure
from persona.data.chat import user_turn
from persona.data.examples import Example
from persona.data.traits import Trait
from persona.models import is_adapter, load_model, load_tokenizer
from persona.steering import generate_steered
from persona.vectors.projection import score_examples

SHIFT_KINDS = ("prompt_last", "response_avg")


def finetuned_models(
    base, base_model: str, names: list[str], **load_kwargs
) -> Iterator[tuple[str, nn.Module]]:
    """Each fine-tuned model in turn, frozen. Adapters go onto the already loaded ``base`` one at a time (PEFT),
    so the base weights are read once for all of them; a full fine-tuned model is loaded by name. ``base`` is
    left as it was (the adapters unloaded, also when the caller stops early or fails)."""
    wrapped = None
    try:
        for index, name in enumerate(names):
            if not is_adapter(name):
                net = load_model(name, **load_kwargs).requires_grad_(False)
                yield name, net
                del net
                release_memory()  # before the next one loads
                continue
            key = f"finetuned_{index}"
            if wrapped is None:
                from peft import PeftModel

                wrapped = PeftModel.from_pretrained(base, name, adapter_name=key)
            else:
                previous = wrapped.active_adapter
                wrapped.load_adapter(name, adapter_name=key)
                wrapped.set_adapter(key)
                wrapped.delete_adapter(previous)
            yield name, wrapped.requires_grad_(False)
    finally:
        if wrapped is not None:
            wrapped.unload()  # the LoRA layers out again: base's own modules back in place
            # PEFT 0.13 leaves the last adapter's config on the base: the next wrap of it would inherit that entry
            # and a same-named adapter would load wrong (tested with two passes over one base).
            base.__dict__.pop("peft_config", None)


def pearson_with_ci(x, y, confidence: float = 0.95) -> dict[str, float]:
    """Pearson r, its p-value and scipy's Fisher-z confidence interval (n = 3 gives the whole [-1, 1])."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "r": nan, "p": nan, "ci_low": nan, "ci_high": nan}
    result = stats.pearsonr(x, y)
    low, high = (-1.0, 1.0) if n == 3 else result.confidence_interval(confidence)
    return {
        "n": n,
        "r": float(result.statistic),
        "p": float(result.pvalue),
        "ci_low": float(low),
        "ci_high": float(high),
    }


def plot_shift(table: pd.DataFrame, correlations: dict[str, dict], path: Path, title: str) -> None:
    """Trait-score change against each shift, one panel per kind, with the least-squares line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    y = table["trait_score_change"].to_numpy(dtype=float)
    for axes, kind in zip(figure.subplots(1, len(SHIFT_KINDS)), SHIFT_KINDS, strict=True):
        x = table[f"shift_{kind}"].to_numpy(dtype=float)
        axes.scatter(x, y, color="tab:blue")
        for xi, yi, name in zip(x, y, table["adapter"], strict=True):
            axes.annotate(
                Path(str(name)).name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        keep = ~(np.isnan(x) | np.isnan(y))
        if keep.sum() >= 2 and np.ptp(x[keep]) > 0:
            slope, intercept = np.polyfit(x[keep], y[keep], 1)
            grid = np.linspace(x[keep].min(), x[keep].max(), 50)
            axes.plot(grid, slope * grid + intercept, color="tab:red", linewidth=1)
        stats = correlations[kind]
        axes.set_title(
            f"{kind}: r = {stats['r']:.2f} [{stats['ci_low']:.2f}, {stats['ci_high']:.2f}], n = {stats['n']}",
            fontsize=9,
        )
        axes.set_xlabel(f"finetuning shift ({kind}) along the persona vector")
        axes.set_ylabel("trait score change (fine-tuned - base)")
        axes.axhline(0, color="grey", linestyle=":", linewidth=1)
        axes.axvline(0, color="grey", linestyle=":", linewidth=1)
    figure.suptitle(title)
    write_figure(path, figure, dpi=120)


def judge_trait_score(
    model, tokenizer, judge, trait: Trait, samples: int, max_new_tokens: int, batch_size: int
) -> float:
    """Mean judge score for the trait over responses to the eval questions (greedy for one sample per
    question, else sampled at temperature 1, as `persona generate` does); unscorable answers are left out."""
    prompts = [user_turn(q) for q in trait.questions for _ in range(samples)]
    answers = generate_steered(
        model,
        tokenizer,
        prompts,
        (),
        max_new_tokens=max_new_tokens,
        temperature=0 if samples == 1 else 1.0,
        batch_size=batch_size,
    )
    scores = judge.score(
        [trait.judge_prompt(p[0]["content"], a) for p, a in zip(prompts, answers, strict=True)]
    )
    values = [s.score for s in scores if s.score is not None and math.isfinite(s.score)]
    if not values:
        raise RuntimeError(f"judge {getattr(judge, 'name', judge)!r} scored none of {len(scores)} answers.")
    return float(np.mean(values))


def make_trait_judge(judge_model: str | None, judge_base_url: str | None):
    if not judge_model:
        raise ValueError(
            "--score judge needs --judge_model (local, local:<model>, openai:<model> or a served name)."
        )
    from persona.judges import make_judge

    return make_judge(judge_model, base_url=judge_base_url)


def measure_shifts(
    base_model: str,
    base,
    finetuned: list[str],
    examples: list[Example],
    trait_score,
    *,
    layer: int,
    direction,
    batch_size: int,
    dtype: str,
    accelerator: str,
    trust_remote_code: bool,
) -> pd.DataFrame:
    """Per fine-tuned model: the mean shift of ``examples``' projections (each kind) from the base model's
    (``base``, already loaded; the adapters go onto it in turn), and its trait score against the base's (``trait_score(model)``)."""
    load_kwargs = {
        "dtype": dtype,
        "device": resolve_device(accelerator),
        "trust_remote_code": trust_remote_code,
    }
    tokenizer = load_tokenizer(base_model, padding_side="right", trust_remote_code=trust_remote_code)
    direction = torch.as_tensor(direction)

    def scores(net) -> dict[str, np.ndarray]:
        return score_examples(
            net,
            tokenizer,
            examples,
            layer,
            direction,
            SHIFT_KINDS,
            batch_size=batch_size,
            accelerator=accelerator,
        )

    base_scores, base_trait = scores(base), trait_score(base)
    print(f"base {base_model}: trait score {base_trait:.4f}")
    rows = []
    for name, net in finetuned_models(base, base_model, finetuned, **load_kwargs):
        found = scores(net)
        row = {"adapter": name}
        for kind in SHIFT_KINDS:
            difference = found[kind] - base_scores[kind]
            row[f"shift_{kind}"] = (
                float(np.nanmean(difference)) if (~np.isnan(difference)).any() else float("nan")
            )
        row["trait_score"] = trait_score(net)
        row["base_trait_score"] = base_trait
        row["trait_score_change"] = row["trait_score"] - base_trait
        rows.append(row)
        print(
            f"{name}: shift_prompt_last {row['shift_prompt_last']:+.4f}, shift_response_avg "
            f"{row['shift_response_avg']:+.4f}, trait score {row['trait_score']:.4f} ({row['trait_score_change']:+.4f})"
        )
    return pd.DataFrame(rows)
