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

import gc
import importlib
import math
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from persona.analysis.likelihood import pair_preference
from persona.analysis.screening import cached_greedy_responses, check_vector_and_layer
from persona.data.build import default_pairs_path
from persona.data.examples import Example, contrastive_pair_examples, format_prompt
from persona.hardware import resolve_device
from persona.models import load_model, load_tokenizer, model_dimensions, model_short_name
from persona.projection import score_examples
from persona.steering import generate_steered
from persona.store import write_csv, write_figure
from persona.traits import Trait, load_trait

SHIFT_KINDS = ("prompt_last", "response_avg")


def is_adapter(name: str) -> bool:
    return (Path(name) / "adapter_config.json").is_file()


def load_finetuned(base_model: str, name: str, **kwargs) -> torch.nn.Module:
    """A PEFT adapter directory on top of the base model, or else a full fine-tuned model by name."""
    if is_adapter(name):
        return load_model(base_model, adapter=name, **kwargs)
    return load_model(name, **kwargs)


def check_finetuned(base_model: str, finetuned: list[str], *, trust_remote_code: bool) -> None:
    if not finetuned:
        raise ValueError("--finetuned needs at least one adapter directory (or fine-tuned model).")
    duplicates = {name for name in finetuned if finetuned.count(name) > 1}
    if duplicates:
        raise ValueError(f"--finetuned lists {sorted(duplicates)} more than once.")
    base_dims = model_dimensions(base_model, trust_remote_code=trust_remote_code)
    for name in finetuned:
        if is_adapter(name):
            continue
        if Path(name).exists() and not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(
                f"--finetuned {name}: neither a PEFT adapter (adapter_config.json) nor a model (config.json)."
            )
        try:
            dims = model_dimensions(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"--finetuned {name}: not a PEFT adapter directory (no adapter_config.json) and not loadable as a "
                f"model ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Fix: check the path."
            ) from error
        if dims != base_dims:
            raise ValueError(
                f"--finetuned {name}: (hidden size, blocks) differ from {base_model}'s {base_dims}."
            )


def pearson_with_ci(x, y, confidence: float = 0.95) -> dict[str, float]:
    """Pearson r, its p-value and a Fisher-z confidence interval (n <= 3 gives the whole [-1, 1])."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "r": nan, "p": nan, "ci_low": nan, "ci_high": nan}
    result = stats.pearsonr(x, y)
    r = float(result.statistic)
    if n <= 3:
        low, high = -1.0, 1.0
    else:
        z_crit = stats.norm.ppf(0.5 + confidence / 2)
        with np.errstate(divide="ignore"):
            z = np.arctanh(np.clip(r, -1.0, 1.0))
        half = z_crit / math.sqrt(n - 3)
        low, high = float(np.tanh(z - half)), float(np.tanh(z + half))
    return {"n": n, "r": r, "p": float(result.pvalue), "ci_low": low, "ci_high": high}


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
    prompts = [[{"role": "user", "content": q}] for q in trait.questions for _ in range(samples)]
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
    try:
        judges = importlib.import_module("persona.judges")
    except ModuleNotFoundError as error:
        if error.name != "persona.judges":
            raise
        raise RuntimeError(
            "--score judge needs persona.judges (issue #4: OpenAI-compatible and local judges), which is not "
            "installed here. Fix: use --score likelihood (offline), or build the judges issue first."
        ) from error
    return judges.make_judge(judge_model, base_url=judge_base_url)


def shift(
    base_model: str,
    finetuned: str | list[str],
    vector_path: str,
    layer: int,
    trait: str,
    output_dir: str | None = None,
    score: Literal["likelihood", "judge"] = "likelihood",
    pairs_path: str | None = None,
    split: str | None = "test",
    eval_path: str | None = None,
    judge_model: str | None = None,
    judge_base_url: str | None = None,
    judge_samples: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    dtype: str = "float32",
    accelerator: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict:
    """Finetuning shift of each fine-tuned model along a persona vector, against its trait score.

    Writes <output_dir>/shift.csv (adapter, shift_prompt_last, shift_response_avg, trait_score,
    base_trait_score, trait_score_change), correlation.csv (Pearson r, p, n, 95% CI via Fisher z, per
    shift kind), shift.png (scatter + fit line) and base_responses.jsonl (the cached greedy responses).

    Args:
        base_model: The model before fine-tuning: alias, hub id or local path.
        finetuned: PEFT adapter directories on base_model (or full fine-tuned models), one point each: a,b,c or [a,b,c].
        vector_path: Vector file [num_layers+1, hidden] from `persona extract`.
        layer: Layer to read (0 = embeddings, L = output of block L-1).
        trait: Trait name: questions from datasets/traits/eval/<trait>.json, pairs from datasets/pairs/<trait>.jsonl.
        output_dir: Output folder; default runs/shift/<base-model-short-name>_<trait>_layer<L>.
        score: Trait score per model: likelihood (mean pair preference on held-out pairs, offline) or judge.
        pairs_path: With --score likelihood: pairs file (JSONL pairs or TRAIT items) instead of the trait's default.
        split: With --score likelihood: only pairs of this split (default test); null for all.
        eval_path: Trait file (or folder) with 'questions' and 'eval_prompt' instead of datasets/traits/eval/<trait>.json.
        judge_model: With --score judge: local, local:<model>, openai:<model> or a model on an OpenAI-compatible server.
        judge_base_url: With --score judge: the OpenAI-compatible server root; default $OPENAI_BASE_URL.
        judge_samples: With --score judge: responses per question (1 = greedy, more = sampled at temperature 1).
        max_new_tokens: Length of the base model's greedy responses (and judged samples).
        batch_size: Examples per forward / generation batch.
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: cpu, gpu or auto (the GPU when there is one).
        seed: Seed for judged sampling.
        trust_remote_code: Allow custom model code from the hub.
    """
    if isinstance(finetuned, str):  # jsonargparse has no nargs="+": accept a,b,c as well as [a,b,c]
        finetuned = [name.strip() for name in finetuned.split(",") if name.strip()]
    finetuned = list(finetuned)
    if score not in ("likelihood", "judge"):
        raise ValueError(f"--score {score!r}. Fix: use likelihood or judge.")
    trait_file = load_trait(eval_path or trait, version="eval")
    questions = list(trait_file.questions)
    check_finetuned(base_model, finetuned, trust_remote_code=trust_remote_code)
    direction = check_vector_and_layer(base_model, vector_path, layer, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(base_model, padding_side="right", trust_remote_code=trust_remote_code)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{base_model}: the tokenizer has no chat template; the shift uses chat-formatted prompts."
        )
    trait_name = trait if eval_path else trait_file.name  # --trait may itself be a trait file path
    if score == "likelihood":
        pairs_file = Path(pairs_path) if pairs_path else default_pairs_path(trait_name)
        pair_examples = contrastive_pair_examples(pairs_file, tokenizer, split=split)
        judge = None
    else:
        judge = make_trait_judge(judge_model, judge_base_url)
    out = Path(
        output_dir or Path("runs") / "shift" / f"{model_short_name(base_model)}_{trait_name}_layer{layer}"
    )
    prompts = [[{"role": "user", "content": question}] for question in questions]
    prompt_texts = [format_prompt(tokenizer, {"messages": p}, where=str(trait_file.path)) for p in prompts]
    load_kwargs = {
        "dtype": dtype,
        "device": resolve_device(accelerator),
        "trust_remote_code": trust_remote_code,
    }

    def trait_score(net) -> float:
        if judge is None:
            return float(pair_preference(net, tokenizer, pair_examples, batch_size=batch_size).mean())
        torch.manual_seed(seed)
        return judge_trait_score(net, tokenizer, judge, trait_file, judge_samples, max_new_tokens, batch_size)

    base = load_model(base_model, **load_kwargs).requires_grad_(False)
    responses = cached_greedy_responses(
        base,
        tokenizer,
        prompts,
        model_name=base_model,
        cache_path=out / "base_responses.jsonl",
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    examples = [
        Example(text, response, 0, f"{trait_file.path.name}:q{i}")
        for i, (text, response) in enumerate(zip(prompt_texts, responses, strict=True))
    ]
    base_scores = score_examples(
        base,
        tokenizer,
        examples,
        layer,
        direction,
        SHIFT_KINDS,
        batch_size=batch_size,
        accelerator=accelerator,
    )
    base_trait = trait_score(base)
    del base
    print(f"base {base_model}: trait score {base_trait:.4f}")

    rows = []
    for name in finetuned:
        net = load_finetuned(base_model, name, **load_kwargs).requires_grad_(False)
        found = score_examples(
            net,
            tokenizer,
            examples,
            layer,
            direction,
            SHIFT_KINDS,
            batch_size=batch_size,
            accelerator=accelerator,
        )
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
            f"{row['shift_response_avg']:+.4f}, trait score {row['trait_score']:.4f} "
            f"({row['trait_score_change']:+.4f})"
        )
        del net
        if torch.cuda.is_available():  # hand the fine-tuned copy's memory back before the next one loads
            gc.collect()
            torch.cuda.empty_cache()

    table = pd.DataFrame(rows)
    csv_path = out / "shift.csv"
    write_csv(csv_path, table)
    correlations = {
        kind: pearson_with_ci(table[f"shift_{kind}"], table["trait_score_change"]) for kind in SHIFT_KINDS
    }
    correlation_table = pd.DataFrame([{"shift": kind, **values} for kind, values in correlations.items()])
    correlation_path = out / "correlation.csv"
    write_csv(correlation_path, correlation_table)
    png_path = out / "shift.png"
    plot_shift(
        table,
        correlations,
        png_path,
        f"{trait_name}: finetuning shift (layer {layer}) vs {score} trait score change",
    )
    for kind, values in correlations.items():
        if math.isnan(values["r"]):
            print(f"Pearson r ({kind}): undefined (n = {values['n']}; needs >= 3 models with varying values)")
        else:
            print(
                f"Pearson r ({kind} shift vs trait score change): {values['r']:.3f} "
                f"(95% CI {values['ci_low']:.3f}..{values['ci_high']:.3f}, p = {values['p']:.3g}, n = {values['n']})"
            )
    print(f"table: {csv_path}\ncorrelation: {correlation_path}\nfigure: {png_path}")
    return {
        "table": str(csv_path),
        "correlation": str(correlation_path),
        "figure": str(png_path),
        "r": correlations["prompt_last"]["r"],
    }
