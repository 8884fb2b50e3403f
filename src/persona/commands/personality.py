"""``persona personality``: judge-free TRAIT personality scores, swept over steering coefficients."""

from __future__ import annotations

import logging
from pathlib import Path

from persona.commands.flags import Hardware
from persona.commands.steer_eval import parse_coefs
from persona.core import checks
from persona.core.errors import PersonaError
from persona.data.personality import read_trait_items, resolve_items_path, split_items
from persona.models import DEFAULT_MODEL, model_dimensions, model_on_base, model_short_name, model_source
from persona.vectors import read_vector_file, vector_filename
from persona.vectors.dose import one_of

log = logging.getLogger(__name__)

DEFAULT_COEFS = (-2.0, -1.0, 0.0, 1.0, 2.0)
METHODS = ("likelihood", "choice")
PRODUCES = ("personality_sweep.csv", "personality_items.csv", "personality_sweep.png")


def _cached_vector_is_fresh(path: Path, model: str, source: Path) -> bool:
    from persona.vectors import load_metadata

    if not path.is_file():
        return False
    meta = load_metadata(path)
    return (
        meta.get("model") == model
        and meta.get("sources") == [str(source)]
        and path.stat().st_mtime >= source.stat().st_mtime
    )


def personality(
    traits: list[str],
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    vector_dir: str | None = None,
    vector_path: str | None = None,
    layer: int | None = None,
    coefs: list[float] | None = None,
    doses: list[float] | None = None,
    allow_high_dose: bool = False,
    method: str = "both",
    split: str = "test",
    output_dir: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    dtype: str = "float32",
    accelerator: str = "auto",
    trust_remote_code: bool = False,
) -> str:
    """Judge-free TRAIT personality scores in [0, 1] per trait, swept over steering coefficients.

    Writes <output_dir>/personality_sweep.csv (trait, method, coef, score, sem, n), personality_items.csv
    (per-item scores) and personality_sweep.png. A trait without a given vector gets one extracted from
    its train split (response_avg, cached in <output_dir>/vectors/).

    Args:
        traits: Traits (a,b or [a,b]): shipped names (datasets/personality/<trait>.json) or TRAIT-format JSON/JSONL files.
        model: Model alias (smollm2-135m, the embedded default), hub id or local path.
        base_model: With --model a LoRA adapter: the base model to apply it on instead of the one its adapter_config.json records (e.g. a path from another machine); the adapter's files are left as they are.
        vector_dir: Folder with <trait>_response_avg_diff.pt for every trait.
        vector_path: One vector file [num_layers+1, hidden] (a single trait only).
        layer: Layer to steer at (0 = embeddings, L = output of block L-1); default the middle layer.
        coefs: Steering coefficients, e.g. -2,-1,0,1,2 or [-2, 0, 2] (default -2,-1,0,1,2 when no --doses).
        doses: Instead of --coefs: doses (|coef|·||v_L|| / mean ||h_L||), so every trait gets the same push relative to the residual stream whatever its vector's norm, e.g. -0.2,0,0.2.
        allow_high_dose: Sweep doses above the limit (the calibrated one at --layer, else the default).
        method: likelihood, choice or both.
        split: Items scored: test, train, or all.
        output_dir: Where to write results; default runs/personality/<model-short-name>/.
        batch_size: Sequences per forward pass.
        overwrite: Replace the sweep's CSVs and PNG if they exist in output_dir.
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: cpu, gpu/cuda or auto (extraction and scoring).
        trust_remote_code: Allow custom model code from the hub.
    """
    model = model_on_base(model, base_model)
    names = [str(t).strip() for t in traits]
    if not names or not all(names):
        raise PersonaError(f"--traits {traits!r}: give trait names, e.g. --traits openness,psychopathy.")
    resolved = dict(resolve_items_path(name) for name in names)
    if len(resolved) != len(names):
        raise PersonaError(f"--traits {traits!r} names a trait twice. Fix: list each once.")
    if method not in (*METHODS, "both"):
        raise PersonaError(f"--method {method!r}. Fix: use likelihood, choice or both.")
    methods = list(METHODS) if method == "both" else [method]
    one_of(coefs, doses, coef_flag="--coefs", dose_flag="--doses")
    grid = parse_coefs(doses, flag="--doses") if doses is not None else parse_coefs(coefs or DEFAULT_COEFS)
    checks.run_settings(batch_size=batch_size, dtype=dtype)
    model_source(model)
    checks.not_both({"--vector_path": vector_path}, {"--vector_dir": vector_dir})
    if vector_path is not None and len(resolved) != 1:
        raise PersonaError(
            f"--vector_path is one trait's vector but --traits lists {len(resolved)}. "
            "Fix: use --vector_dir with <trait>_response_avg_diff.pt files, or one trait."
        )
    items_by_trait = {
        name: split_items(read_trait_items(path), None if split == "all" else split, path)
        for name, path in resolved.items()
    }
    hidden_size, num_layers = model_dimensions(model, trust_remote_code=trust_remote_code)
    layer = num_layers // 2 if layer is None else layer
    checks.layers_in_range([layer], num_layers, "--layer", model)
    out = Path(output_dir) if output_dir else Path("runs") / "personality" / model_short_name(model)
    checks.output_dir(
        out, "--output_dir", produces=PRODUCES, overwrite=overwrite, inputs={"--vector_path": vector_path}
    )
    steered = any(c != 0 for c in grid)
    given = given_vectors(resolved, vector_path, vector_dir) if steered else {}
    for path in given.values():
        read_vector_file(path, hidden_size=hidden_size, num_layers=num_layers)
    to_extract = [name for name in resolved if steered and name not in given]
    if doses is not None and not allow_high_dose:
        check_doses(grid, list(given.values()) + ([None] if to_extract else []), layer)
    for name in to_extract:
        split_items(read_trait_items(resolved[name]), "train", resolved[name])
    if split == "train" and to_extract:
        log.warning("Scoring the train split with vectors extracted from it: the scores are in-sample.")
    from persona.models import shared_models

    with shared_models():  # the extractions and the sweep read one copy of the model
        return run_sweep(
            model, resolved, items_by_trait, given, to_extract, out, layer=layer, methods=methods, split=split,
            strengths={"doses" if doses is not None else "coefs": grid},
            batch_size=batch_size, dtype=dtype, accelerator=accelerator, trust_remote_code=trust_remote_code,
        )  # fmt: skip


def given_vectors(
    resolved: dict[str, Path], vector_path: str | None, vector_dir: str | None
) -> dict[str, Path]:
    if vector_path is not None:
        return {next(iter(resolved)): Path(vector_path)}
    if vector_dir is None:
        return {}
    given = {name: Path(vector_dir) / vector_filename(name, "response_avg") for name in resolved}
    absent = [str(p) for p in given.values() if not p.is_file()]
    if absent:
        raise PersonaError(
            f"--vector_dir {vector_dir} lacks {', '.join(absent)}. Fix: extract them "
            "(persona extract --pairs_path <items> --split train) or drop --vector_dir."
        )
    return given


def run_sweep(model, resolved, items_by_trait, given, to_extract, out: Path, *, layer, methods, split, strengths,
              batch_size, dtype, accelerator, trust_remote_code) -> str:  # fmt: skip
    """Extract the missing vectors (cached), load the model once, score every trait at every coefficient."""
    from persona.analysis.personality import (
        chat_prompt,
        letter_token_ids,
        personality_sweep,
        plot_personality_sweep,
    )
    from persona.commands.extract import extract
    from persona.core.hardware import resolve_device
    from persona.core.store import write_csv
    from persona.models import load_model_and_tokenizer, load_tokenizer
    from persona.vectors import load_vector

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    chat_prompt(tokenizer, "check")  # a chat template, and (for choice) one-token option letters
    if "choice" in methods:
        letter_token_ids(tokenizer)
    device = resolve_device(accelerator)
    given = dict(given)
    for name in to_extract:
        cached = out / "vectors" / vector_filename(name, "response_avg")
        if _cached_vector_is_fresh(cached, model, resolved[name]):
            print(f"{name}: reusing {cached}")
        else:
            hardware = Hardware(dtype=dtype, accelerator="gpu" if device.type == "cuda" else "cpu",
                                trust_remote_code=trust_remote_code)  # fmt: skip
            extract(model=model, pairs_path=str(resolved[name]), split="train", trait=name,
                    save_dir=str(out / "vectors"), overwrite=True, batch_size=batch_size, hardware=hardware)  # fmt: skip
        given[name] = cached
    vectors = {name: load_vector(path) for name, path in given.items()}
    lm, tokenizer = load_model_and_tokenizer(
        model, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    lm.requires_grad_(False)
    doses, norm = (
        strengths.get("doses"),
        dose_norm(given, layer, model, lm, tokenizer, strengths.get("doses")),
    )
    summary, per_item = personality_sweep(lm, tokenizer, items_by_trait, vectors, layer, strengths.get("coefs"),
                                          methods, batch_size=batch_size, doses=doses, norm=norm)  # fmt: skip
    summary["layer"] = layer
    paths = [out / name for name in PRODUCES]
    write_csv(paths[0], summary)
    write_csv(paths[1], per_item)
    plot_personality_sweep(summary, paths[2], title=f"{model_short_name(model)}: {split} items, layer {layer}",
                           x="dose" if doses is not None else "coef")  # fmt: skip
    print(f"scores: {paths[0]}\nitems: {paths[1]}\nfigure: {paths[2]}")
    return str(paths[0])


def dose_norm(given: dict, layer: int, model: str, lm, tokenizer, doses) -> float | None:
    """The layer's mean residual norm (from a vector's sidecar, else measured on this model); None when the sweep
    is in coefficients and no vector records norms."""
    from persona.vectors.dose import layer_norms, stored_norms

    if not given:
        return None
    first = next(iter(given.values()))
    if doses is None:
        norms = stored_norms(first, model)
        return None if norms is None else norms[layer]
    return layer_norms(first, model=model, lm=lm, tokenizer=tokenizer)[layer]


def check_doses(doses: list[float], paths, layer: int) -> None:
    """Every trait's doses within its limit (its sidecar's calibrated dose at ``layer``, else the default), before
    anything loads; a trait whose vector is still to be extracted has no calibration: the default limit."""
    from persona.vectors.dose import DEFAULT_MAX_DOSE, check_dose, dose_limit

    largest = max(abs(dose) for dose in doses)
    for path in paths:
        limit = dose_limit(path, layer) if path is not None else (DEFAULT_MAX_DOSE, "the default limit")
        check_dose(largest, *limit, flag="--doses", force="--allow_high_dose")
