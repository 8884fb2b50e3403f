"""What a study runs: the model, the judge, the traits, the phases, the hardware and the sizes.

Plain dataclasses, so jsonargparse turns them into ``--judge.model``-style flags and YAML sections
(``persona study -c configs/study/<name>.yaml``, ``--print_config``); every field is checked before any
model loads. Import-light (no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from persona.constants import MIN_MASS
from persona.errors import PersonaError
from persona.hardware import ACCELERATORS, check_dtype


@dataclass
class StudyTrait:
    """One trait of the study."""

    name: str
    """A shipped trait (datasets/pairs/<name>.jsonl, datasets/personality/<name>.json, datasets/traits/) or the
    path of your own trait file, told by its content: a seed trait artifact (instruction, questions,
    eval_prompt; the generation route), contrastive pairs JSONL, TRAIT items or Anthropic persona statements."""
    pairs: str | None = None
    """Contrastive pairs (pairs JSONL, TRAIT items, persona statements) for vectors and held-out metrics;
    default found from ``name``."""
    generate: bool = False
    """Also the paper's route: persona-prompted answers judged by the study's judge, filtered, extracted
    (a shipped trait's artifacts datasets/traits/{extract,eval}/<name>.json; always on for an artifact file)."""


@dataclass
class JudgeSettings:
    """The judge of generated answers: ``local`` (the embedded model in process), ``local:<model>``, or a
    model served by an OpenAI-compatible API (key from ``OPENAI_API_KEY`` only)."""

    model: str = "local"
    base_url: str | None = None
    """The OpenAI-compatible server root, e.g. http://127.0.0.1:8080/v1 (vLLM, llama.cpp server, Ollama)."""
    min_mass: float | None = None
    """Local judges only: least probability on numbers for a score (default the seed's 0.25)."""
    timeout: float | None = None
    """API judges: seconds per call (default 30; raise it for a slow local server)."""
    concurrency: int | None = None
    """API judges: calls in flight (default 8; 1-2 for a local server on one GPU)."""


@dataclass
class Phases:
    """Which phases run (finished phases of the run directory are reused either way)."""

    layers: bool = True
    sweep: bool = True
    """Judge-free steering sweep: likelihood of trait-positive vs negative answers over the coefficients."""
    judged_sweep: bool = False
    """Judged steering sweep (persona steer-eval): trait and coherence scores of steered answers."""
    generated: bool = True
    """The paper's route for traits with ``generate: true``."""
    generations: bool = True
    """Steered answers side by side at -coef, 0, +coef."""
    finetune: bool = True
    """LoRA mixtures with the monitor, preventative steering, CAFT, finetuning shift and ΔP screening."""
    export: bool = True
    """The first trait's vector as a llama.cpp control vector (its recommended layer)."""


@dataclass
class Hardware:
    accelerator: str = "auto"
    """cpu, gpu or auto (the GPU when there is one)."""
    devices: int = 1
    """Devices for the Lightning loops (extraction, layer metrics)."""
    strategy: str = "auto"
    dtype: str = "auto"
    """float32, bfloat16, float16 or auto (bfloat16 on a GPU, float32 on the CPU)."""


@dataclass
class Sizes:
    batch_size: int = 8
    coefs: list[float] = field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0])
    """Coefficient grid of the sweeps."""
    max_new_tokens: int = 48
    """Length of generated answers (generation route, steered generations, judged sweep)."""
    questions: int = 2
    """Questions per side of the generation route (the seed uses all 20)."""
    n_per_question: int = 1
    """Answers per question and instruction in the generation route (1 = greedy, as the seed for one)."""
    filter_threshold: float | None = 50.0
    """The generation route's filter, the seed's: keep pairs whose positive answer scores >= this, whose negative
    one scores < 100 - this, both coherence >= 50. null: use every pair (for a judge too weak to pass it; when the
    filter keeps no pair, every pair is used too, but the filtered vectors count as missed)."""
    judged_questions: int = 5
    """Questions per coefficient in the judged sweep."""
    finetune_samples: int = 24
    """Conversations per fine-tuning mixture."""
    finetune_epochs: int = 2
    finetune_mixtures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    finetune_interventions: bool = True
    """Also the all-trait mixture with preventative steering and with CAFT."""
    steering_coef: float = 4.0
    """Preventative steering coefficient of the fine-tuning study."""


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
    from persona import checks
    from persona.judges import check_min_mass, check_served_judge
    from persona.study.traits import plan_traits

    checks.model_source(model, "model")
    if phases.finetune and checks.is_adapter(model):
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
    if not sizes.coefs or not all(math.isfinite(c) for c in sizes.coefs):
        raise PersonaError(f"sizes.coefs={sizes.coefs}: give finite coefficients, e.g. [-2, -1, 0, 1, 2].")
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
    from persona import checks
    from persona.data.examples import read_checked_pairs
    from persona.data.personality import resolve_items_path
    from persona.traits import TraitError, load_trait

    if checks.is_adapter(model):
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
