"""What a study runs: the model, the judge, the traits, the phases, the hardware and the sizes.

Plain dataclasses, so jsonargparse turns them into ``--judge.model``-style flags and YAML sections
(``persona study -c configs/study/<name>.yaml``, ``--print_config``); every field is checked before any
model loads. Import-light (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    calibrate: bool = True
    """Per trait, the dose where coherence falls to sizes.calibration_target at its best layers (persona calibrate,
    judge-free proxies); later phases steer with the recommendation."""
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
    coefs: list[float] | None = field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0])
    """Coefficient grid of the sweeps (null with doses)."""
    doses: list[float] | None = None
    """Instead of coefs: a grid of doses (|coef|·‖v‖/mean‖h‖ at the layer, signed), converted per trait's vector."""
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
    steering_coef: float | None = 4.0
    """Preventative steering coefficient of the fine-tuning study (null with steering_dose)."""
    steering_dose: float | None = None
    """Instead of steering_coef: the preventative steering dose."""
    calibration_target: float = 80.0
    """Coherence (0-100) the calibration phase calibrates each trait's dose to."""
    calibration_layers: int = 2
    """How many of the best layers (held-out AUC) each trait's calibration searches."""
    calibration_probes: int = 6
    """At most this many probes per layer."""
    calibration_questions: int = 4
    """Held-out questions answered per probe."""
    calibration_tokens: int = 24
    """New tokens per greedy answer of a probe."""
    calibration_pairs: int | None = 6
    """Held-out pairs scored per probe (null: all)."""
