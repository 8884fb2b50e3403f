"""Every field of a study config checked before any model loads: one line each, naming the field and the fix."""

from __future__ import annotations

import math

from persona.core.constants import MIN_MASS
from persona.core.errors import PersonaError
from persona.core.hardware import ACCELERATORS, check_dtype
from persona.models import is_adapter
from persona.study.config import Hardware, JudgeSettings, Phases, Sizes, StudyTrait


def check_config(
    model: str,
    traits: list[StudyTrait | str],
    judge: JudgeSettings,
    phases: Phases,
    hardware: Hardware,
    sizes: Sizes,
) -> list:
    """Every field that can be wrong, checked before any model loads (one line each, naming the field); returns
    the traits' plans (:class:`persona.study.traits.TraitPlan`)."""
    from persona.core import checks
    from persona.judges import check_min_mass, check_served_judge
    from persona.models import model_source
    from persona.study.traits import plan_traits

    model_source(model, "model")
    if phases.finetune and is_adapter(model):
        raise PersonaError(
            f"model={model!r} is a LoRA adapter, and the fine-tuning study trains new adapters on a whole model. "
            "Fix: phases.finetune: false to study the fine-tuned model, or its base model to run the fine-tuning."
        )
    if hardware.accelerator not in ACCELERATORS:
        raise PersonaError(
            f"hardware.accelerator={hardware.accelerator!r}. Fix: one of {', '.join(ACCELERATORS)}."
        )
    check_dtype(hardware.dtype)
    for name in ("batch_size", "max_new_tokens", "questions", "n_per_question", "judged_questions"):
        checks.at_least(getattr(sizes, name), 1, f"sizes.{name}")
    checks.at_least(sizes.finetune_samples, 4, "sizes.finetune_samples")
    checks.at_least(sizes.finetune_epochs, 1, "sizes.finetune_epochs")
    if sizes.filter_threshold is not None and not 0 <= sizes.filter_threshold <= 100:
        raise PersonaError(f"sizes.filter_threshold={sizes.filter_threshold}: a score in [0, 100], or null.")
    check_strengths(sizes)
    check_min_mass(judge.model, judge.min_mass, flag="judge.min_mass", local="judge.model: local")
    if judge.base_url is not None and judge.model.startswith("local"):
        raise PersonaError(
            "judge.base_url is for a served judge; judge.model local runs in process. Fix: drop one."
        )
    if not 0.0 <= (judge.min_mass if judge.min_mass is not None else MIN_MASS) <= 1.0:
        raise PersonaError(f"judge.min_mass={judge.min_mass}: a probability in [0, 1].")
    plans = plan_traits(traits)
    judged = any(p.generate and (phases.generated or p.pairs is None) for p in plans) or (
        phases.judged_sweep and any(p.artifact for p in plans)
    )
    if judged:
        check_served_judge(judge.model, judge.base_url, model_field="judge.model", url_field="judge.base_url")
    return plans


def check_personality_arm(model: str, trait: str) -> None:
    """The personality arm's trait: TRAIT items with train and test splits, and eval questions for the monitor."""
    from persona.data.examples import read_checked_pairs
    from persona.data.personality import resolve_items_path
    from persona.data.traits import TraitError, load_trait

    if is_adapter(model):
        raise PersonaError(
            f"personality_arm: {trait!r} fine-tunes the model, and model={model!r} is a LoRA adapter. "
            "Fix: personality_arm: null, or the base model."
        )
    try:
        name, items = resolve_items_path(trait)
        load_trait(name, "eval")
    except (TraitError, ValueError, FileNotFoundError) as error:
        raise PersonaError(
            f"personality_arm: {error} Fix: a personality trait with TRAIT items and eval questions, e.g. openness."
        ) from None
    splits = {record.get("split") for record in read_checked_pairs(items, "personality_arm")}
    if not {"train", "test"} <= splits:
        raise PersonaError(
            f"personality_arm: {items} has splits {sorted(map(str, splits))}; the arm trains on 'train' items "
            "and measures on 'test' ones. Fix: give its items both splits."
        )


def check_strengths(sizes: Sizes) -> None:
    """Coefficients or doses (exactly one of each pair), finite; the calibration target inside 0-100."""
    from persona.core import checks

    for coef_field, dose_field in (("coefs", "doses"), ("steering_coef", "steering_dose")):
        coef, dose = getattr(sizes, coef_field), getattr(sizes, dose_field)
        if (coef is None) == (dose is None):
            raise PersonaError(
                f"sizes.{coef_field}={coef} and sizes.{dose_field}={dose}: give exactly one. Fix: set the other "
                "to null."
            )
        values = coef if coef is not None else dose
        values = values if isinstance(values, list) else [values]
        if not values or not all(math.isfinite(v) for v in values):
            name = coef_field if coef is not None else dose_field
            raise PersonaError(f"sizes.{name}={values}: give finite numbers, e.g. [-2, -1, 0, 1, 2].")
    if not 0 < sizes.calibration_target < 100:
        raise PersonaError(
            f"sizes.calibration_target={sizes.calibration_target}: a coherence between 0 and 100. Fix: e.g. 80."
        )
    for name in ("calibration_layers", "calibration_questions", "calibration_tokens"):
        checks.at_least(getattr(sizes, name), 1, f"sizes.{name}")
    checks.at_least(sizes.calibration_probes, 2, "sizes.calibration_probes")
