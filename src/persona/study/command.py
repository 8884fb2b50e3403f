"""``persona study`` (the whole method on your model, judge and hardware) and ``persona demo`` (its embedded default)."""

from __future__ import annotations

from persona.core import checks
from persona.core.errors import PersonaError
from persona.models import model_on_base
from persona.study.checks import check_config, check_personality_arm
from persona.study.config import (
    Hardware,
    JudgeSettings,
    Phases,
    Sizes,
    StudyTrait,
)


def study(
    model: str,
    traits: list[StudyTrait | str],
    base_model: str | None = None,
    judge: JudgeSettings = JudgeSettings(),
    phases: Phases = Phases(),
    hardware: Hardware = Hardware(),
    sizes: Sizes = Sizes(),
    run_dir: str = "runs/study",
    layer: int | None = None,
    personality_arm: str | None = None,
    title: str = "persona study",
) -> str:
    """Run the whole method on one model, ending in report.md; re-running resumes (finished phases are reused).

    Use a config: persona study -c configs/study/qwen2.5-7b-instruct.yaml (--print_config shows every field;
    any field can be overridden, e.g. --hardware.accelerator gpu --judge.base_url http://127.0.0.1:8080/v1).

    Args:
        model: Model alias (smollm2-135m, embedded), hub id, local path or LoRA adapter directory.
        base_model: With model a LoRA adapter: the base to apply it on instead of the one its adapter_config.json records.
        traits: Traits to study: shipped names or paths of your own trait files, bare or as entries, e.g.
            [my_traits/pessimistic.json, {name: evil, generate: true}, psychopathy]. The first trait with
            contrastive pairs and a layer gets the steered generations, the fine-tuning study and the export.
        judge: The judge of generated answers: local, local:<model>, or a served model (base_url; key from OPENAI_API_KEY).
        phases: Which phases run.
        hardware: accelerator, devices, strategy, dtype (auto: the GPU in bfloat16 when there is one).
        sizes: Batch size, coefficient grid, generation lengths and counts, fine-tuning sizes.
        run_dir: The run directory (results.json, report.md, one folder per phase).
        layer: Steer (sweeps, generations, fine-tuning) at this layer; default each trait's recommended layer.
        personality_arm: A personality trait (TRAIT items, e.g. openness) to fine-tune on its high-trait answers,
            then compare its vector's quality in the base and the fine-tuned model; null: none.
        title: The report's title.
    """
    model = model_on_base(model, base_model, "base_model")
    plans = check_config(model, traits, judge, phases, hardware, sizes)
    if personality_arm is not None:
        check_personality_arm(model, personality_arm)
    steers = phases.sweep or phases.judged_sweep or phases.generations or phases.finetune or phases.export
    if layer is None and not phases.layers and steers:
        raise PersonaError(
            "phases.layers is off and no layer is set, but the later phases steer at a layer. Fix: turn "
            "phases.layers on (the recommended layer) or give --layer."
        )
    if layer is not None:
        from persona.models import model_dimensions

        checks.layers_in_range([layer], model_dimensions(model)[1], "--layer", model)
    checks.output_dir(run_dir, "--run_dir", overwrite=True)  # a run directory is resumed, never refused
    from persona.study.run import run_study

    return run_study(
        model=model, traits=list(traits), plans=plans, judge=judge, phases=phases, hardware=hardware, sizes=sizes,
        run_dir=run_dir, layer=layer, personality_arm=personality_arm, title=title,
    )  # fmt: skip


def demo(run_dir: str = "runs/demo", quick: bool = False, accelerator: str = "auto") -> str:
    """The whole method on the embedded model, offline, ending in report.md: the study of configs/study/demo.yaml.

    Args:
        run_dir: Run directory; re-running continues it, reusing finished phases.
        quick: Smoke run (about 2 minutes): one trait, three coefficients, no judged generation, three short LoRA runs.
        accelerator: cpu, gpu or auto.
    """
    config = demo_config(quick=quick)
    config["hardware"].accelerator = accelerator
    return study(**config, run_dir=run_dir)


def demo_config(*, quick: bool = False) -> dict:
    """The demo's study settings (configs/study/demo.yaml holds the same; a test keeps them equal)."""
    traits = [StudyTrait("evil", generate=True), StudyTrait("psychopathy")]
    # The embedded judge scores its own answers far below the seed's filter; the calibration is the demo's smallest
    # (one layer, <= 5 probes of 3 short answers and 4 pairs) to keep its time budget.
    sizes = Sizes(filter_threshold=None, calibration_layers=1, calibration_probes=5, calibration_questions=3,
                  calibration_tokens=16, calibration_pairs=4)  # fmt: skip
    phases = Phases()
    if quick:
        traits = traits[:1]
        phases.generated = False
        sizes.coefs, sizes.max_new_tokens = [-2.0, 0.0, 2.0], 24
        sizes.finetune_samples, sizes.finetune_epochs = 8, 1
        sizes.finetune_mixtures, sizes.finetune_interventions = [0.0, 0.5, 1.0], False
    return {
        "model": "smollm2-135m",
        "traits": traits,
        "judge": JudgeSettings(model="local", min_mass=0.0),
        "phases": phases,
        "hardware": Hardware(),
        "sizes": sizes,
        "personality_arm": None if quick else "openness",
        "title": "persona demo",
    }
