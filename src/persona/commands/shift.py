"""``persona shift``: finetuning shift of fine-tuned models along a persona vector, against their trait scores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from persona.core import checks
from persona.core.errors import PersonaError
from persona.data.traits import load_trait
from persona.models import is_adapter, model_dimensions, model_short_name, model_source
from persona.vectors import vector_for_model

PRODUCES = ("shift.csv", "correlation.csv", "shift.png")


def check_finetuned(base_model: str, finetuned: list[str], *, trust_remote_code: bool) -> None:
    if not finetuned:
        raise PersonaError("--finetuned needs at least one adapter directory (or fine-tuned model).")
    duplicates = {name for name in finetuned if finetuned.count(name) > 1}
    if duplicates:
        raise PersonaError(f"--finetuned lists {sorted(duplicates)} more than once.")
    base_dims = model_dimensions(base_model, trust_remote_code=trust_remote_code)
    for name in finetuned:
        if is_adapter(name):
            continue
        model_source(name, "--finetuned")  # not an adapter: then a full fine-tuned model
        dims = model_dimensions(name, trust_remote_code=trust_remote_code)
        if dims != base_dims:
            raise PersonaError(
                f"--finetuned {name}: (hidden size, blocks) differ from {base_model}'s {base_dims}."
            )


def shift(
    base_model: str,
    finetuned: list[str],
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
    overwrite: bool = False,
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
        overwrite: Replace shift.csv, correlation.csv and shift.png if they exist (the response cache is reused).
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: cpu, gpu or auto (the GPU when there is one).
        seed: Seed for judged sampling.
        trust_remote_code: Allow custom model code from the hub.
    """
    finetuned = list(finetuned)
    if score not in ("likelihood", "judge"):
        raise PersonaError(f"--score {score!r}. Fix: use likelihood or judge.")
    checks.run_settings(batch_size=batch_size, dtype=dtype)
    checks.at_least(max_new_tokens, 1, "--max_new_tokens")
    model_source(base_model, "--base_model")
    checks.input_file(vector_path, "--vector_path", what="vector file")
    checks.input_file(pairs_path, "--pairs_path")
    trait_file = load_trait(eval_path or trait, version="eval")
    trait_name = trait if eval_path else trait_file.name  # --trait may itself be a trait file path
    out = Path(
        output_dir or Path("runs") / "shift" / f"{model_short_name(base_model)}_{trait_name}_layer{layer}"
    )
    inputs = {"--vector_path": vector_path, "--pairs_path": pairs_path}
    checks.output_dir(out, "--output_dir", produces=PRODUCES, overwrite=overwrite, inputs=inputs)
    check_finetuned(base_model, finetuned, trust_remote_code=trust_remote_code)
    vector = vector_for_model(base_model, vector_path, layers=[layer], trust_remote_code=trust_remote_code)
    if score == "judge" and not judge_model:
        raise PersonaError(
            "--score judge needs --judge_model (local, local:<model>, openai:<model> or a served name)."
        )

    from persona.analysis.shift import measure_shifts

    base, examples, trait_score = shift_inputs(
        base_model, trait_file, trait_name, out, score=score, pairs_path=pairs_path, split=split,
        judge_model=judge_model, judge_base_url=judge_base_url, judge_samples=judge_samples,
        max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype, accelerator=accelerator,
        seed=seed, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    table = measure_shifts(
        base_model, base, finetuned, examples, trait_score, layer=layer, direction=vector[layer], batch_size=batch_size,
        dtype=dtype, accelerator=accelerator, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    return write_shift_outputs(
        table, out, f"{trait_name}: finetuning shift (layer {layer}) vs {score} trait score change"
    )


def shift_inputs(base_model, trait_file, trait_name, out, *, score, pairs_path, split, judge_model, judge_base_url,
                 judge_samples, max_new_tokens, batch_size, dtype, accelerator, seed, trust_remote_code):  # fmt: skip
    """The base model (loaded once), the examples read along the vector (eval questions + the base model's
    cached greedy answers) and the trait-score function (likelihood on held-out pairs, or a judge)."""
    import torch

    from persona.analysis.likelihood import pair_preference
    from persona.analysis.screening import cached_greedy_responses
    from persona.analysis.shift import judge_trait_score, make_trait_judge
    from persona.core.hardware import resolve_device
    from persona.data.build import default_pairs_path
    from persona.data.chat import has_chat_template, user_turn
    from persona.data.examples import Example, contrastive_pair_examples, format_prompt
    from persona.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(base_model, padding_side="right", trust_remote_code=trust_remote_code)
    if not has_chat_template(tokenizer):
        raise PersonaError(
            f"{base_model}: the tokenizer has no chat template; the shift uses chat-formatted prompts."
        )
    if score == "likelihood":
        pairs = contrastive_pair_examples(
            pairs_path or default_pairs_path(trait_name), tokenizer, split=split
        )
        judge = None
    else:
        judge = make_trait_judge(judge_model, judge_base_url)

    def trait_score(net) -> float:
        if judge is None:
            return float(pair_preference(net, tokenizer, pairs, batch_size=batch_size).mean())
        torch.manual_seed(seed)
        return judge_trait_score(net, tokenizer, judge, trait_file, judge_samples, max_new_tokens, batch_size)

    prompts = [user_turn(question) for question in trait_file.questions]
    device = resolve_device(accelerator)
    base = load_model(
        base_model, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    ).requires_grad_(False)
    responses = cached_greedy_responses(
        base, tokenizer, prompts, model_name=base_model, cache_path=out / "base_responses.jsonl",
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )  # fmt: skip
    examples = [
        Example(
            format_prompt(tokenizer, {"messages": p}, where=str(trait_file.path)),
            r,
            0,
            f"{trait_file.path.name}:q{i}",
        )
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    return base, examples, trait_score


def write_shift_outputs(table, out: Path, title: str) -> dict:
    import pandas as pd

    from persona.analysis.shift import SHIFT_KINDS, pearson_with_ci, plot_shift
    from persona.core.store import write_csv

    correlations = {
        kind: pearson_with_ci(table[f"shift_{kind}"], table["trait_score_change"]) for kind in SHIFT_KINDS
    }
    paths = {name: out / name for name in PRODUCES}
    write_csv(paths["shift.csv"], table)
    write_csv(
        paths["correlation.csv"], pd.DataFrame([{"shift": kind, **v} for kind, v in correlations.items()])
    )
    plot_shift(table, correlations, paths["shift.png"], title)
    for kind, values in correlations.items():
        if math.isnan(values["r"]):
            print(f"Pearson r ({kind}): undefined (n = {values['n']}; needs >= 3 models with varying values)")
        else:
            print(
                f"Pearson r ({kind} shift vs trait score change): {values['r']:.3f} "
                f"(95% CI {values['ci_low']:.3f}..{values['ci_high']:.3f}, p = {values['p']:.3g}, n = {values['n']})"
            )
    print(
        f"table: {paths['shift.csv']}\ncorrelation: {paths['correlation.csv']}\nfigure: {paths['shift.png']}"
    )
    return {
        "table": str(paths["shift.csv"]),
        "correlation": str(paths["correlation.csv"]),
        "figure": str(paths["shift.png"]),
        "r": correlations["prompt_last"]["r"],
    }
