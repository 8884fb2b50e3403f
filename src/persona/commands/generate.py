"""``persona generate``: persona-prompted answers to a trait's questions, judged for the trait and coherence.

The seed's ``eval_persona.py`` flags. Resumable (see :mod:`persona.generation.journal`); a re-run with another judge
re-judges the kept answers without regenerating them.
"""

from __future__ import annotations

import hashlib
import json
import logging

from persona.commands.flags import Hardware
from persona.core import checks
from persona.core.constants import POSITIONS
from persona.core.errors import PersonaError
from persona.data.traits import load_trait
from persona.generation.journal import ResponseStore, plan_items
from persona.models import DEFAULT_MODEL, model_on_base, model_source
from persona.vectors import load_metadata, vector_for_model

log = logging.getLogger(__name__)


def generate(
    trait: str,
    output_path: str,
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    persona_instruction_type: str | None = None,
    assistant_name: str | None = None,
    version: str = "extract",
    n_per_question: int = 10,
    max_questions: int | None = None,
    max_tokens: int = 1000,
    temperature: float | None = None,
    judge_model: str = "local",
    judge_base_url: str | None = None,
    judge_min_mass: float | None = None,
    judge_timeout: float | None = None,
    judge_concurrency: int | None = None,
    coef: float | None = None,
    dose: float | None = None,
    vector_path: str | None = None,
    layer: int | None = None,
    steering_type: str = "response",
    allow_high_dose: bool = False,
    cap_lo: float | str | None = None,
    cap_hi: float | str | None = None,
    when_above: float | str | None = None,
    when_below: float | str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    engine: bool = True,
    hardware: Hardware = Hardware(),
) -> str:
    """Answer a trait's questions under persona system prompts (or steering) and judge each answer 0-100.

    Writes a CSV with question, prompt, answer, question_id, sample, <trait>, coherence (+ <trait>_method,
    coherence_method, judge); `persona extract` reads a pos and a neg file. Re-running the same command
    resumes an interrupted run and retries missing judge scores; with another --judge_model it re-judges
    every answer without regenerating it.

    Args:
        trait: Trait name (datasets/traits/<version>/<trait>.json) or a trait file/folder path.
        output_path: The CSV to write (resumed if it exists and was made with the same settings).
        model: Model alias (smollm2-135m, the embedded default), hub id or local path.
        base_model: With --model a LoRA adapter: the base model to apply it on instead of the one its adapter_config.json records (e.g. a path from another machine); the adapter's files are left as they are.
        persona_instruction_type: pos, neg or none: which instruction of each pair goes into the system prompt.
        assistant_name: Name in "You are a/an <name> assistant."; default the trait (pos) or its antonym/"helpful" (neg).
        version: extract or eval: which question set.
        n_per_question: Samples per (question, instruction).
        max_questions: Only the first N questions (quick runs).
        max_tokens: Maximum new tokens per answer (alias --max_new_tokens).
        temperature: Sampling temperature; default 1.0, or 0 (greedy) when n_per_question is 1, as the seed.
        judge_model: Judge: local (in-process smollm2-135m), local:<model>, or a model served by an OpenAI-compatible API.
        judge_base_url: Base URL of the judge's OpenAI-compatible API (key from the environment).
        judge_min_mass: Local judges only: least probability on numeric answers for a score (default the seed's 0.25); 0 scores the expected number given a numeric answer, which small judges such as the embedded model need.
        judge_timeout: API judges: seconds per call before it is retried (default 30; raise it for slow local servers).
        judge_concurrency: API judges: calls in flight at once (default 8; 1-2 for a local server on one GPU).
        coef: Steering coefficient, a raw multiplier of the vector (with vector_path and layer; or --dose).
        dose: Steering strength relative to the layer's typical residual norm: |coef|·‖v‖/mean‖h‖ (transfers across layers and models; instead of --coef).
        vector_path: Vector file [num_layers+1, hidden] to steer with; alone, its calibrated recommendation (`persona calibrate`) gives layer and dose.
        layer: Layer to steer at (0 = embeddings, L = output of block L-1).
        steering_type: Positions to steer: response, generated, prompt or all.
        allow_high_dose: Steer above the dose limit (the calibrated dose at the layer, else 1.0).
        cap_lo: Cap the projection on --vector_path's unit direction at --layer from below (every position, after the steering): a number (projection units), a percentile of the sidecar's trait-free examples (p1..p99) or of the neutral texts (neutral:p1..neutral:p99). Without --coef/--dose: cap only.
        cap_hi: Cap it from above, e.g. p99 (cut only excursions toward the trait).
        when_above: Steer (and cap) only the prompts whose last token projects on the vector at --layer above this (a number, p1..p99 or neutral:p1..neutral:p99); decided at prefill, held for the whole answer.
        when_below: Likewise, only prompts that project below this.
        batch_size: Answers generated per batch (also the unit of resumption).
        seed: Base seed; each batch's seed is derived from it and the batch's keys.
        overwrite: Start over, deleting an existing output_path and its journal.
        engine: Generate on the continuous-batching engine where it can run (transformers >= 5.24, not GPT-NeoX, no gate, no adapter; else the static path, the reason logged); false: always the static path. Greedy answers are the same on both; sampled ones draw per answer on the engine (recorded in the run's settings).
    """
    model = model_on_base(model, base_model)
    instruction_type = check_flags(
        persona_instruction_type, n_per_question, max_tokens, batch_size, max_questions, steering_type
    )
    model_source(model)
    bounds = {"--cap_lo": cap_lo, "--cap_hi": cap_hi, "--when_above": when_above, "--when_below": when_below}
    steering = check_steering(model, coef, vector_path, layer, hardware.trust_remote_code, dose=dose,
                              allow_high_dose=allow_high_dose, bounds=bounds)  # fmt: skip
    if steering is not None:
        steering["steering_type"] = steering_type
    if temperature is None:
        temperature = 0.0 if n_per_question == 1 else 1.0
    if temperature < 0:
        raise PersonaError(f"--temperature {temperature}: must be >= 0 (0 = greedy).")
    if judge_timeout is not None:
        checks.at_least(judge_timeout, 1, "--judge_timeout")
    if judge_concurrency is not None:
        checks.at_least(judge_concurrency, 1, "--judge_concurrency")
    loaded = load_trait(trait, version)
    from persona.judges import check_served_judge

    check_served_judge(judge_model, judge_base_url)
    if instruction_type is None and assistant_name is not None:
        log.warning("--assistant_name is ignored without --persona_instruction_type pos|neg")
    path = checks.output_file(
        output_path, "--output_path", inputs={"--vector_path": vector_path}, exists_ok=True
    )
    items = plan_items(loaded, instruction_type, assistant_name, n_per_question, max_questions)
    store = ResponseStore(path, loaded.name)
    signature = run_signature(loaded, model, hardware.dtype, version, instruction_type, assistant_name, max_tokens,
                              temperature, seed, steering)  # fmt: skip
    # The engine draws each answer from its own seed: other samples than the static path's.
    if engine and temperature > 0:
        signature["sampler"] = "per-answer seeds (engine)"
    from persona.generation.predict_loop import run_generation

    return run_generation(
        store, loaded, items, signature, overwrite=overwrite, batch_size=batch_size, seed=seed, model=model,
        dtype=hardware.dtype, max_tokens=max_tokens, temperature=temperature, steering=steering,
        judge=dict(spec=judge_model, base_url=judge_base_url, min_mass=judge_min_mass, timeout=judge_timeout,
                   concurrency=judge_concurrency),
        trainer=hardware.trainer, trust_remote_code=hardware.trust_remote_code, engine=engine,
    )  # fmt: skip


def check_flags(
    persona_instruction_type, n_per_question, max_tokens, batch_size, max_questions, steering_type
):
    instruction_type = None if persona_instruction_type in (None, "none") else persona_instruction_type
    if instruction_type not in (None, "pos", "neg"):
        raise PersonaError(
            f"--persona_instruction_type {persona_instruction_type!r}. Fix: use pos, neg or none."
        )
    checks.at_least(batch_size, 1, "--batch_size")
    checks.at_least(n_per_question, 1, "--n_per_question")
    checks.at_least(max_tokens, 1, "--max_tokens")
    if max_questions is not None:
        checks.at_least(max_questions, 1, "--max_questions")
    if steering_type not in POSITIONS:
        raise PersonaError(f"--steering_type {steering_type!r}. Fix: use one of {', '.join(POSITIONS)}.")
    return instruction_type


def resolve_bounds(vector_path, layer: int, bounds: dict, model: str | None = None) -> dict:
    """--cap_lo/--cap_hi/--when_above/--when_below -> numbers (percentiles from the vector's sidecar at ``layer``),
    keyed cap_lo, cap_hi, when_above, when_below; only those given. A ``neutral:`` percentile an older file lacks
    is measured once with ``model`` and cached beside the file (:func:`persona.vectors.neutral_ranges.neutral_percentiles`)."""
    from persona.vectors.ranges import needs_neutral, resolve_bound

    meta = load_metadata(vector_path)
    if model is not None and needs_neutral(*bounds.values()):
        from persona.vectors.neutral_ranges import neutral_percentiles
        from persona.vectors.ranges import NEUTRAL_KEY

        meta = {**meta, NEUTRAL_KEY: neutral_percentiles(vector_path, model=model)}
    resolved = {}
    for flag, value in bounds.items():
        if value is not None:
            try:
                resolved[flag[2:]] = resolve_bound(
                    value, path=vector_path, meta=meta, layer=layer, field=flag
                )
            except ValueError as error:
                raise PersonaError(str(error)) from None
    if "when_above" in resolved and "when_below" in resolved:
        raise PersonaError("--when_above and --when_below: give one. Fix: drop one of them.")
    lo, hi = resolved.get("cap_lo"), resolved.get("cap_hi")
    if lo is not None and hi is not None and lo > hi:
        raise PersonaError(f"--cap_lo {lo:g} is above --cap_hi {hi:g}. Fix: pass --cap_lo <= --cap_hi.")
    return resolved


def _cap_only(vector_path, layer, bounds: dict, model: str) -> dict:
    """--vector_path --layer with a cap and no --coef/--dose: a cap (maybe gated), no push."""
    if layer is None:
        raise PersonaError("--cap_lo/--cap_hi without --coef or --dose need --layer. Fix: pass --layer.")
    resolved = resolve_bounds(vector_path, layer, bounds, model)
    return {"vector_path": str(vector_path), "layer": layer, "coef": None, **resolved}


def check_steering(
    model, coef, vector_path, layer, trust_remote_code, *, dose=None, allow_high_dose=False, bounds=None
) -> dict | None:
    """The steering settings checked against the model (no weights loaded; norms measured once for an old file).

    --vector_path with --layer and --coef or --dose; or --vector_path alone (or with --layer) when its sidecar
    holds `persona calibrate`'s recommendation. Nothing given: no steering. ``bounds``: the cap and gate flags
    (see :func:`resolve_bounds`); a cap needs no strength, a gate needs something to gate."""
    from persona.commands.strength import resolve_strength

    bounds = {flag: value for flag, value in (bounds or {}).items() if value is not None}
    given = {"--coef": coef, "--dose": dose, "--vector_path": vector_path, "--layer": layer, **bounds}
    if all(value is None for value in given.values()):
        return None
    capped = any(flag.startswith("--cap") for flag in bounds)
    if capped and coef is None and dose is None and vector_path is not None:
        vector_for_model(model, vector_path, layers=[] if layer is None else [layer],
                         trust_remote_code=trust_remote_code)  # fmt: skip
        return _cap_only(vector_path, layer, bounds, model)
    if vector_path is None:
        named = ", ".join(flag for flag, value in given.items() if value is not None)
        raise PersonaError(
            f"Steering needs --vector_path; got {named} without it. Fix: pass --vector_path (with --layer and "
            "--coef or --dose), or none of them."
        )
    if coef is not None:
        checks.finite(coef, "--coef")
    vector_for_model(
        model, vector_path, layers=[] if layer is None else [layer], trust_remote_code=trust_remote_code
    )
    strength = resolve_strength(
        model, vector_path, layer, coef=coef, dose=dose, allow_high_dose=allow_high_dose
    )
    if strength.layer != layer:
        vector_for_model(model, vector_path, layers=[strength.layer], trust_remote_code=trust_remote_code)
    print(f"steering: {strength.describe()}", flush=True)
    source_model = load_metadata(vector_path).get("model")
    if source_model not in (None, model):
        log.warning("%s was extracted from %s, not %s", vector_path, source_model, model)
    steering = {"vector_path": str(vector_path), "layer": strength.layer, "coef": strength.coef}
    return {**steering, **resolve_bounds(vector_path, strength.layer, bounds, model)}


def run_signature(
    loaded, model, dtype, version, instruction_type, assistant_name, max_tokens, temperature, seed, steering
):
    """The settings that make two runs' rows comparable; a resumed run must match them exactly."""
    content = json.dumps(
        [loaded.questions, [(p.pos, p.neg) for p in loaded.instructions], loaded.eval_prompt]
    )
    return {
        "model": model,
        "dtype": dtype,
        "trait": loaded.name,
        "version": version,
        "trait_sha256": hashlib.sha256(content.encode()).hexdigest()[:16],
        "persona_instruction_type": instruction_type,
        "assistant_name": None
        if instruction_type is None
        else (assistant_name or loaded.assistant_name(instruction_type)),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "steering": steering,
    }
