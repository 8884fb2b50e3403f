"""`persona steer-eval`: judged trait expression and coherence of steered answers over a coefficient grid.

Each coefficient is one ordinary `persona generate` run on the trait's eval questions (no persona
instruction, steering on) into ``<output_dir>/coef_<c>.csv``, so every coefficient is resumable on its own
and a re-run only does what is missing. Then ``summary.csv`` (mean ± sem of the trait and coherence
scores per coefficient, with how many rows were scored or left unscored) and ``summary.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from persona.commands.flags import Hardware
from persona.core.store import write_csv, write_figure
from persona.models import DEFAULT_MODEL, model_on_base


def parse_coefs(coefs: Sequence[float], *, flag: str = "--coefs") -> list[float]:
    """A list of steering coefficients (or doses) -> sorted distinct finite floats (the CLI also takes -2,-1,0,1,2)."""
    values = [float(value) for value in ([coefs] if isinstance(coefs, int | float) else coefs)]
    if not values:
        raise ValueError(f"{flag} is empty. Fix: e.g. {flag}=-2,-1,0,1,2.")
    bad = [value for value in values if not math.isfinite(value)]
    if bad:
        raise ValueError(f"{flag} {coefs!r} holds {bad[0]}, not a finite number. Fix: use finite values.")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} {coefs!r} lists a value twice. Fix: list each once.")
    return sorted(value + 0.0 for value in values)  # + 0.0: -0.0 -> 0.0, so file names never say "-0"


def coef_filename(coef: float) -> str:
    return f"coef_{coef + 0.0:g}.csv"


def dose_filename(dose: float) -> str:
    return f"dose_{dose + 0.0:g}.csv"


def sweep_points(
    model, vector_path, layer, coefs, doses, allow_high_dose
) -> tuple[int, list[tuple[float, float, str]], str]:
    """(layer, [(coef, dose, file name)], where they came from): --coefs or --doses at --layer, or around the
    calibrated recommendation (doses -d, -d/2, 0, d/2, d at its layer) when neither layer nor strength is given."""
    from persona.vectors import load_vector
    from persona.vectors.dose import layer_norms, one_of, recommendation, resolve

    one_of(coefs, doses, coef_flag="--coefs", dose_flag="--doses")
    source = "--doses" if doses is not None else "--coefs"
    advice = recommendation(vector_path) if coefs is None and doses is None else None
    if advice is not None and layer in (None, int(advice["layer"])):
        dose = abs(float(advice["dose"]))
        layer, doses, source = int(advice["layer"]), [-dose, -dose / 2, 0.0, dose / 2, dose], "recommended"
        print(
            f"steer-eval: layer {layer} and doses ±{dose:.4g} from the calibrated recommendation in the sidecar"
        )
    if layer is None:
        raise ValueError(
            f"--layer is missing and {vector_path}'s sidecar has no calibrated recommendation. Fix: pass --layer, "
            f"or run `persona calibrate --vector_path {vector_path}` first."
        )
    if doses is None:
        coefs = (-2.0, -1.0, 0.0, 1.0, 2.0) if coefs is None else coefs
    values = parse_coefs(
        doses if doses is not None else coefs, flag=source if source != "recommended" else "--doses"
    )
    vector, norms = load_vector(vector_path), layer_norms(vector_path, model=model)
    points = []
    for value in values:
        given = {"dose": value} if doses is not None else {"coef": value}
        coef, dose = resolve(vector_path, vector[layer], layer, norms, **given, force=allow_high_dose or source == "recommended",
                             flags=("--coefs", "--doses", "--allow_high_dose"))  # fmt: skip
        points.append((coef, dose, dose_filename(dose) if doses is not None else coef_filename(coef)))
    return layer, points, source


def default_output_dir(vector_path: str | Path, layer: int, steering_type: str) -> Path:
    vector_path = Path(vector_path)
    return vector_path.parent / f"{vector_path.stem}_steer_eval_layer{layer}_{steering_type}"


def _mean_sem(values: pd.Series) -> tuple[float, float]:
    if values.empty:
        return float("nan"), float("nan")
    sem = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), sem


def summarize(paths: dict[float, Path], trait: str, doses: dict[float, float] | None = None) -> pd.DataFrame:
    """One row per coefficient (its dose beside it): trait/coherence mean and sem over scored rows, counts."""
    rows = []
    for coef, path in sorted(paths.items()):
        frame = pd.read_csv(path)
        dose = (doses or {}).get(coef, float("nan"))
        row = {"trait": trait, "coef": coef, "dose": dose, "n": len(frame)}
        for metric, column in (("trait", trait), ("coherence", "coherence")):
            values = pd.to_numeric(frame[column], errors="coerce").dropna()
            row[f"{metric}_mean"], row[f"{metric}_sem"] = _mean_sem(values)
            row[f"{metric}_n_scored"], row[f"{metric}_n_missing"] = len(values), len(frame) - len(values)
        rows.append(row)
    return pd.DataFrame(rows)


def plot_summary(summary: pd.DataFrame, path: Path, title: str = "", x: str = "coef") -> None:
    """Trait score and coherence vs coefficient in two panels sharing the x axis (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 6), layout="constrained")
    FigureCanvasAgg(figure)
    trait_axes, coherence_axes = figure.subplots(2, 1, sharex=True)
    trait = str(summary["trait"].iloc[0])
    for axes, metric, color, label in (
        (trait_axes, "trait", "tab:red", f"{trait} score (judge, 0-100)"),
        (coherence_axes, "coherence", "tab:blue", "coherence (judge, 0-100)"),
    ):
        axes.errorbar(
            summary[x],
            summary[f"{metric}_mean"],
            yerr=summary[f"{metric}_sem"].fillna(0),
            marker="o",
            capsize=3,
            color=color,
        )
        axes.set_ylabel(label)
        axes.set_ylim(-2, 102)
    coherence_axes.set_xlabel("steering dose (|coef|·‖v‖/mean‖h‖)" if x == "dose" else "steering coefficient")
    if title:
        figure.suptitle(title)
    write_figure(path, figure, dpi=120)


def steer_eval(
    trait: str,
    vector_path: str,
    layer: int | None = None,
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    coefs: list[float] | None = None,
    doses: list[float] | None = None,
    allow_high_dose: bool = False,
    cap_lo: float | str | None = None,
    cap_hi: float | str | None = None,
    when_above: float | str | None = None,
    when_below: float | str | None = None,
    steering_type: str = "response",
    n_per_question: int = 1,
    max_questions: int | None = None,
    max_tokens: int = 200,
    temperature: float | None = None,
    judge_model: str = "local",
    judge_base_url: str | None = None,
    judge_min_mass: float | None = None,
    output_dir: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    engine: bool = True,
    hardware: Hardware = Hardware(),
) -> str:
    """Steer with a persona vector at each coefficient, answer the trait's eval questions, judge trait and coherence.

    Writes <output_dir>/coef_<c>.csv per coefficient (`persona generate` files, resumable), summary.csv (coef,
    trait and coherence mean/sem, rows scored and missing) and summary.png. Re-running resumes.

    Args:
        trait: Trait name (datasets/traits/eval/<trait>.json) or a trait file/folder path.
        vector_path: Vector file [num_layers+1, hidden] to steer with.
        layer: Layer to steer at (0 = embeddings, L = output of block L-1); default the calibrated recommendation's.
        model: Model alias (smollm2-135m, the embedded default), hub id or local path.
        base_model: With --model a LoRA adapter: the base model to apply it on instead of the one its adapter_config.json records (e.g. a path from another machine); the adapter's files are left as they are.
        coefs: Coefficients, e.g. "-2,-1,0,1,2" (write --coefs=-2,-1,0,1,2 when it starts with a minus) or [-2, 0, 2]; default -2..2, or with neither --layer nor --doses the calibrated recommendation's doses.
        doses: Doses instead of coefficients (|coef|·‖v‖/mean‖h‖ at the layer, signed), e.g. --doses=-0.3,0,0.3.
        allow_high_dose: Steer above the dose limit (the calibrated dose at the layer, else 1.0).
        cap_lo: Also cap the projection on the vector at the layer from below at every coefficient (a number, p1..p99 or neutral:p1..neutral:p99 of the sidecar; see `persona generate`).
        cap_hi: Also cap it from above, e.g. p99.
        when_above: Steer (and cap) only prompts whose last token projects above this at the layer (a number, p1..p99 or neutral:p99).
        when_below: Likewise, only prompts that project below this.
        steering_type: Positions to steer: response, generated, prompt or all.
        n_per_question: Answers per question and coefficient.
        max_questions: Only the first N eval questions (quick runs).
        max_tokens: Maximum new tokens per answer.
        temperature: Sampling temperature; default 1.0, or 0 (greedy) when n_per_question is 1.
        judge_model: Judge: local (in-process smollm2-135m) or a model served by an OpenAI-compatible API.
        judge_base_url: Base URL of the judge's OpenAI-compatible API (key from the environment).
        judge_min_mass: Local judges only: least probability on numeric answers for a score (default 0.25); the embedded judge needs 0.
        output_dir: Where to write; default <vector-stem>_steer_eval_layer<L>_<steering_type>/ beside the vector.
        batch_size: Answers generated per batch (also the unit of resumption).
        seed: Base seed of every coefficient's run (so coefficients differ only by the steering).
        overwrite: Start every coefficient's file over.
        engine: Generate on the continuous-batching engine where it can run, else the static path (see `persona generate --engine`); false: always the static path.
    """
    model = model_on_base(model, base_model)
    from persona.commands.generate import generate, resolve_bounds
    from persona.core.constants import POSITIONS
    from persona.data.traits import load_trait
    from persona.judges import check_min_mass, check_served_judge
    from persona.models import model_dimensions
    from persona.steering import SteeringSpec
    from persona.vectors import load_vector

    # Everything that can be wrong with the inputs fails here, before a model loads.
    if steering_type not in POSITIONS:
        raise ValueError(f"--steering_type {steering_type!r}. Fix: use one of {', '.join(POSITIONS)}.")
    check_min_mass(judge_model, judge_min_mass)
    loaded = load_trait(trait, "eval")
    check_served_judge(judge_model, judge_base_url)
    hidden_size, num_layers = model_dimensions(model, trust_remote_code=hardware.trust_remote_code)
    vector = load_vector(vector_path, hidden_size=hidden_size, num_layers=num_layers)
    if layer is not None:
        SteeringSpec(layer, vector, 1.0, positions=steering_type)  # layer in range
    layer, points, source = sweep_points(model, vector_path, layer, coefs, doses, allow_high_dose)
    bounds = {"cap_lo": cap_lo, "cap_hi": cap_hi, "when_above": when_above, "when_below": when_below}
    # Fails here, not per coef (an older file's neutral percentiles are measured here once, with the model).
    resolve_bounds(vector_path, layer, {f"--{k}": v for k, v in bounds.items()}, model)
    SteeringSpec(layer, vector, 1.0, positions=steering_type)  # the recommended layer in range too
    out = Path(output_dir) if output_dir else default_output_dir(vector_path, layer, steering_type)

    from persona.models import shared_models

    paths: dict[float, Path] = {}
    with shared_models():  # one model (and local judge) for every coefficient, not one load per coefficient
        for coef, dose, filename in points:
            print(
                f"--- {loaded.name}: coefficient {coef:.4g}, dose {dose:.4g} ({len(paths) + 1}/{len(points)})",
                flush=True,
            )
            paths[coef] = Path(
                generate(trait=trait, output_path=str(out / filename), model=model, persona_instruction_type=None,
                         version="eval", n_per_question=n_per_question, max_questions=max_questions,
                         max_tokens=max_tokens, temperature=temperature, judge_model=judge_model,
                         judge_base_url=judge_base_url, judge_min_mass=judge_min_mass, coef=coef,
                         vector_path=vector_path, layer=layer, steering_type=steering_type, batch_size=batch_size,
                         seed=seed, overwrite=overwrite, engine=engine, hardware=hardware, **bounds)
            )  # fmt: skip
    # Under Lightning's ddp launcher every rank runs this command; the first writes the summary.
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return str(out / "summary.csv")
    doses = {coef: dose for coef, dose, _ in points}
    return write_summary(paths, out, loaded.name, f"{Path(vector_path).name}, layer {layer}, {steering_type}",
                         doses=doses, x="coef" if source == "--coefs" else "dose",
                         judge_model=judge_model, judge_min_mass=judge_min_mass)  # fmt: skip


def write_summary(paths: dict[float, Path], out: Path, trait: str, what: str, *, doses: dict, x: str,
                  judge_model: str, judge_min_mass: float | None) -> str:  # fmt: skip
    """summary.csv and summary.png of the runs (each coefficient with its dose), printed; a hint when the local
    judge scored few."""
    summary = summarize(paths, trait, doses)
    csv_path, png_path = out / "summary.csv", out / "summary.png"
    write_csv(csv_path, summary)
    plot_summary(summary, png_path, title=f"{trait}: {what}", x=x)
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"summary: {csv_path}\nfigure: {png_path}")
    missing = int(summary["trait_n_missing"].sum())
    if missing > summary["n"].sum() / 2 and judge_model.startswith("local") and judge_min_mass is None:
        print(
            f"{missing} of {int(summary['n'].sum())} trait scores are missing: a small local judge rarely puts "
            "0.25 of its mass on numbers. Fix: re-run with --judge_min_mass 0 --overwrite true (an unscorable verdict is an answer, not retried)."
        )
    return str(csv_path)
