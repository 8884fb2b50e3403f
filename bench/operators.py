"""What the new operators do on the embedded model, judge-free (issue 25), and what they cost.

Run: python bench/operators.py [--max_tokens 48] [--dose 0.3]

- **Gate** (`when` on the trait itself): steer away from `evil` only where the prompt's last token projects above
  a threshold — the midpoint between the mean reading of the neutral prompts and of the trait's eval questions
  (stated, not tuned). Reports how many prompts of each set fire, the share of neutral replies byte-identical to
  unsteered, and the trait expression of the replies to the trait's questions.
- **Cap**: steer toward `evil` with and without a cap at the 95th percentile of the per-token projections of the
  unsteered replies to the neutral prompts (the model's ordinary range); the cap alone on neutral prompts. Then the
  same at the two ranges the sidecar records: ``hi = p99`` (trait-free examples) and ``hi = neutral:p99`` (the
  neutral texts).
- **Trait expression** (judge-free, named in the output): the mean projection of a reply's tokens on the unit
  vector at the layer, read by the unsteered model — the quantity `persona project` reports.
- **Cost**: generation time of the same batch plainly steered, capped and gated (ratios to plain steering).

Greedy decoding throughout, so "byte-identical" is a property of the operator, not of sampling luck.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import QUESTIONS  # noqa: F401  (sets the offline environment before persona imports)

from persona.models import load_model_and_tokenizer
from persona.serve.monitoring import NEUTRAL_PROMPTS
from persona.steering import SteeringSpec, generate_steered
from persona.steering.interventions import CapSpec, Gate
from persona.vectors import load_metadata, load_vector
from persona.vectors.dose import dose_to_coef, layer_norms

ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "persona_vectors" / "smollm2-135m" / "evil_response_avg_diff.pt"


def chats(prompts):
    return [[{"role": "user", "content": prompt}] for prompt in prompts]


@torch.no_grad()
def prompt_readings(lm, tokenizer, prompts, unit, layer) -> torch.Tensor:
    """The projection of each prompt's last token at ``layer`` (what the gate reads), one prompt at a time."""
    readings = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            chats([prompt])[0], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[layer]
        readings.append(float(hidden[0, -1] @ unit))
    return torch.tensor(readings)


@torch.no_grad()
def reply_projections(lm, tokenizer, prompts, replies, unit, layer) -> list[torch.Tensor]:
    """Per-token projections of each reply at ``layer`` under the unsteered model."""
    out = []
    for prompt, reply in zip(prompts, replies, strict=True):
        messages = chats([prompt])[0]
        prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prefix + reply, return_tensors="pt", add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[layer]
        out.append(hidden[0, start:] @ unit)
    return out


def expression(projections: list[torch.Tensor]) -> float:
    return float(torch.stack([p.mean() for p in projections if len(p)]).mean())


def timed(run) -> tuple[list[str], float]:
    start = time.perf_counter()
    replies = run()
    return replies, time.perf_counter() - start


def recorded_caps(generate, lm, tokenizer, layer, toward, neutral, plain_neutral, questions, unit) -> None:
    """Caps at the ranges the sidecar records: ``hi = p99`` of the trait-free examples and ``hi = neutral:p99`` of the
    neutral texts — the neutral replies a cap alone leaves byte-identical, and what it leaves of the push toward."""
    for bound in ("p99", "neutral:p99"):
        cap = CapSpec.from_file(VECTOR, layer, hi=bound)
        alone = generate(neutral, [cap])
        same = sum(a == b for a, b in zip(plain_neutral, alone, strict=True))
        replies = generate(questions, [toward, cap])
        shown = expression(reply_projections(lm, tokenizer, questions, replies, unit, layer))
        print(f"Cap at hi={bound} ({cap.hi:.3f}, sidecar): neutral replies byte-identical under the cap alone "
              f"{same}/{len(neutral)}; trait questions, steered toward + cap: expression {shown:+.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument(
        "--dose", type=float, default=0.3, help="steering strength (dose units), away or toward"
    )
    parser.add_argument("--layer", type=int, default=17, help="the shipped evil vector's recommended layer")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lm, tokenizer = load_model_and_tokenizer("smollm2-135m")
    vector = load_vector(VECTOR)
    layer = args.layer
    unit = vector[layer] / vector[layer].norm()
    coef = dose_to_coef(args.dose, vector[layer], layer_norms(VECTOR, model="smollm2-135m")[layer])
    questions = json.loads((ROOT / "datasets" / "traits" / "eval" / "evil.json").read_text())["questions"]
    neutral = list(NEUTRAL_PROMPTS)
    generate = lambda prompts, specs: generate_steered(  # noqa: E731
        lm, tokenizer, chats(prompts), specs, max_new_tokens=args.max_tokens, temperature=0.0
    )
    print(
        f"vector {VECTOR.name}, layer {layer}, dose {args.dose} = coef {coef:.3g}; {load_metadata(VECTOR)['model']}"
    )

    neutral_readings = prompt_readings(lm, tokenizer, neutral, unit, layer)
    trait_readings = prompt_readings(lm, tokenizer, questions, unit, layer)
    threshold = float((neutral_readings.mean() + trait_readings.mean()) / 2)
    gate = Gate(layer, vector, above=threshold)
    away = SteeringSpec(layer, vector, -coef, positions="response")
    gated_away = SteeringSpec(layer, vector, -coef, positions="response", when=gate)
    print(
        f"\nGate at {threshold:.3f} (midpoint of the mean readings {neutral_readings.mean():.3f} neutral, "
        f"{trait_readings.mean():.3f} trait questions): fires on {int((neutral_readings > threshold).sum())}/"
        f"{len(neutral)} neutral prompts, {int((trait_readings > threshold).sum())}/{len(questions)} trait questions"
    )
    generate(neutral[:4], [away])  # warm-up: the first generate pays one-off costs
    plain_neutral, t_unsteered = timed(lambda: generate(neutral, []))
    gated_neutral, t_gated = timed(lambda: generate(neutral, [gated_away]))
    _, t_steered = timed(lambda: generate(neutral, [away]))
    same = sum(a == b for a, b in zip(plain_neutral, gated_neutral, strict=True))
    print(f"neutral replies byte-identical to unsteered under the gated push: {same}/{len(neutral)}")
    plain_q = generate(questions, [])
    results = {
        "unsteered": plain_q,
        "steered away (ungated)": generate(questions, [away]),
        "steered away, gated": generate(questions, [gated_away]),
    }
    for name, replies in results.items():
        print(
            f"  trait questions, {name}: expression {expression(reply_projections(lm, tokenizer, questions, replies, unit, layer)):+.3f}"
        )

    neutral_tokens = torch.cat(reply_projections(lm, tokenizer, neutral, plain_neutral, unit, layer))
    hi = float(torch.quantile(neutral_tokens, 0.95))
    cap = CapSpec(layer, vector, None, hi)
    toward = SteeringSpec(layer, vector, coef, positions="response")
    print(f"\nCap at hi={hi:.3f} (95th percentile of {len(neutral_tokens)} neutral reply tokens)")
    capped_neutral, t_capped = timed(lambda: generate(neutral, [toward, cap]))
    alone = generate(neutral, [cap])
    print(f"neutral replies byte-identical to unsteered under the cap alone: "
          f"{sum(a == b for a, b in zip(plain_neutral, alone, strict=True))}/{len(neutral)}")  # fmt: skip
    for name, specs in (
        ("unsteered", []),
        ("steered toward", [toward]),
        ("steered toward + cap", [toward, cap]),
    ):
        replies = generate(questions, specs)
        print(
            f"  trait questions, {name}: expression {expression(reply_projections(lm, tokenizer, questions, replies, unit, layer)):+.3f}"
        )
    recorded_caps(generate, lm, tokenizer, layer, toward, neutral, plain_neutral, questions, unit)

    print(
        f"\nCost ({len(neutral)} prompts x {args.max_tokens} tokens, greedy): unsteered {t_unsteered:.2f} s, "
        f"steered {t_steered:.2f} s; gated / steered {t_gated / t_steered:.3f}, "
        f"steered+capped / steered {t_capped / t_steered:.3f}"
    )


if __name__ == "__main__":
    main()
