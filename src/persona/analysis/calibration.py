"""Calibration: per layer, the dose where coherence falls to a target, and the trait expression there (TA@C<target>).

Judge-free proxies (named in every output, :data:`PROXIES`):

- **trait** — the likelihood trait score (:func:`persona.analysis.likelihood.pair_preference`) on held-out pairs,
  steered at every position: mean over pairs of the per-token mean log-probability of the positive answer minus
  the negative one's.
- **coherence** — greedy answers to held-out questions, steered; the unsteered model reads them. With ``nll`` the
  mean over answers of the per-token negative log-likelihood (EOS included) under the *unsteered* model,
  ``coherence = 100 · min(1, exp(nll_unsteered_answers − nll_steered_answers))`` = 100 × the inverse perplexity
  ratio, capped at 100: 100 when the steered answers read as plausibly as the model's own, 50 at twice the
  perplexity.

The search per layer (:func:`calibrate_layer`) brackets the target between dose 0 (coherence 100) and
``max_dose``, then narrows the bracket by safeguarded false position (the interpolated dose, kept inside the
middle 80 % of the bracket, so it never does worse than bisection by much) until a probe lands within
``tolerance`` of the target or ``max_probes`` probes are spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from persona.data.batches import left_pad
from persona.data.chat import encode_chat, user_turn
from persona.models.logits import logits_at
from persona.steering import SteeringSpec, steer

PROXIES = {
    "trait": "likelihood: mean logp(positive) - logp(negative) per response token on held-out pairs",
    "coherence": "perplexity ratio: 100*min(1, exp(nll(unsteered answers) - nll(steered answers))), "
    "both read by the unsteered model",
}


def judged_scores(judge_name: str) -> dict:
    """What a judge-scored calibration measures, named as :data:`PROXIES` names the judge-free one."""
    return {
        "trait": f"judge {judge_name}: the trait's eval prompt, 0-100, mean over steered greedy answers to "
        "held-out eval questions",
        "coherence": f"judge {judge_name}: the coherence prompt, 0-100, mean over the same answers",
    }


@torch.no_grad()
def greedy_answers(lm, tokenizer, prompts: Sequence[list[int]], specs, max_tokens: int) -> list[list[int]]:
    """Greedy answer token ids per prompt under ``specs`` (cut after the first EOS, which is kept)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(prompts, pad)
    device = lm.get_input_embeddings().weight.device
    with steer(lm, specs):
        out = lm.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    answers = []
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list | tuple) else [configured]
    stops = {tokenizer.eos_token_id, *configured} - {None}
    for row in out[:, input_ids.shape[1] :].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:end])
    return answers


@torch.no_grad()
def answer_nll(lm, prompts: Sequence[list[int]], answers: Sequence[list[int]], pad: int) -> float:
    """Mean over answers of the per-token NLL of each answer after its prompt (no steering)."""
    rows = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    input_ids, attention_mask = left_pad(rows, pad)
    device = lm.get_input_embeddings().weight.device
    width, longest = input_ids.shape[1], max(len(answer) for answer in answers)
    if longest == 0:
        return math.nan  # no answer token to score
    # The answers are the rows' last tokens (left padding); position t predicts token t + 1.
    positions = torch.arange(width - 1 - longest, width - 1, device=device)
    input_ids = input_ids.to(device)
    logits = logits_at(lm, input_ids, attention_mask.to(device), positions).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprobs = logprobs.gather(-1, input_ids[:, positions + 1].unsqueeze(-1)).squeeze(-1)
    per_answer = [
        -float(token_logprobs[i, longest - len(answer) :].mean()) for i, answer in enumerate(answers)
    ]
    return sum(per_answer) / len(per_answer)


def coherence_score(nll_steered: float, nll_unsteered: float) -> float:
    """The proxy's 0-100 coherence (see the module docstring)."""
    return 100.0 * min(1.0, math.exp(nll_unsteered - nll_steered))


@dataclass
class Prober:
    """Scores one (layer, dose): the steered answers' coherence and the likelihood trait score."""

    lm: object
    tokenizer: object
    vector: torch.Tensor  # [num_layers + 1, hidden]
    norms: Sequence[float]  # mean residual norm per layer
    questions: Sequence[str]
    pairs: Sequence  # persona.data.examples.Example, alternating positive / negative
    max_tokens: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.prompts = [encode_chat(self.tokenizer, user_turn(q)) for q in self.questions]
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._baseline_nll: float | None = None

    def coef(self, layer: int, dose: float) -> float:
        from persona.vectors.dose import dose_to_coef

        return dose_to_coef(dose, self.vector[layer], self.norms[layer])

    def baseline_nll(self) -> float:
        if self._baseline_nll is None:
            answers = greedy_answers(self.lm, self.tokenizer, self.prompts, [], self.max_tokens)
            self._baseline_nll = answer_nll(self.lm, self.prompts, answers, self.pad)
        return self._baseline_nll

    def unsteered_trait(self) -> float:
        from persona.analysis.likelihood import pair_preference

        return float(pair_preference(self.lm, self.tokenizer, self.pairs, batch_size=self.batch_size).mean())

    def __call__(self, layer: int, dose: float) -> dict:
        from persona.analysis.likelihood import pair_preference

        coef = self.coef(layer, dose)
        answers = greedy_answers(
            self.lm, self.tokenizer, self.prompts, [SteeringSpec(layer, self.vector, coef)], self.max_tokens
        )
        nll = answer_nll(self.lm, self.prompts, answers, self.pad)
        with steer(self.lm, [SteeringSpec(layer, self.vector, coef, positions="all")]):
            trait = float(
                pair_preference(self.lm, self.tokenizer, self.pairs, batch_size=self.batch_size).mean()
            )
        sample = self.tokenizer.decode(answers[0], skip_special_tokens=True)
        return {
            "layer": layer, "dose": dose, "coef": coef, "coherence": coherence_score(nll, self.baseline_nll()),
            "trait": trait, "nll": nll, "nll_unsteered": self.baseline_nll(), "sample_answer": sample[:200],
        }  # fmt: skip


def next_dose(low: tuple[float, float], high: tuple[float, float], target: float) -> float:
    """The dose to probe inside the bracket (dose, coherence) low (>= target) .. high (< target)."""
    (d0, c0), (d1, c1) = low, high
    guess = d0 + (c0 - target) * (d1 - d0) / (c0 - c1) if c0 != c1 else (d0 + d1) / 2
    margin = 0.1 * (d1 - d0)
    return min(max(guess, d0 + margin), d1 - margin)


def calibrate_layer(
    probe: Callable[[int, float], dict], layer: int, *, target: float, max_probes: int, tolerance: float,
    max_dose: float, sign: float = 1.0,
) -> tuple[list[dict], dict]:  # fmt: skip
    """(every probe, the chosen one) for one layer: the dose where coherence is within ``tolerance`` of
    ``target``; else the probe nearest the target on the coherent side (flagged ``reached: False``)."""
    rows = []

    def run(dose: float) -> dict:
        row = dict(probe(layer, sign * dose), probe=len(rows) + 1)
        rows.append(row)
        return row

    low = (0.0, 100.0)
    first = run(max_dose)
    high = (max_dose, first["coherence"])
    chosen = first if abs(first["coherence"] - target) <= tolerance else None
    if first["coherence"] >= target and chosen is None:  # the target is not reached within max_dose
        return rows, dict(first, reached=False, error=first["coherence"] - target)
    while chosen is None and len(rows) < max_probes:
        row = run(next_dose(low, high, target))
        point = (abs(row["dose"]), row["coherence"])
        if abs(row["coherence"] - target) <= tolerance:
            chosen = row
        elif row["coherence"] > target:
            low = point
        else:
            high = point
    if chosen is None:
        coherent = [r for r in rows if r["coherence"] >= target] or rows
        chosen = min(coherent, key=lambda r: abs(r["coherence"] - target))
    return rows, dict(chosen, reached=abs(chosen["coherence"] - target) <= tolerance,
                      error=chosen["coherence"] - target)  # fmt: skip


def recommend(chosen: dict[int, dict]) -> dict:
    """The (layer, dose) with the highest trait score at the target coherence (reached layers first)."""
    reached = {layer: row for layer, row in chosen.items() if row["reached"]} or chosen
    layer = max(reached, key=lambda key: reached[key]["trait"])
    return reached[layer]


@dataclass
class JudgedProber(Prober):
    """Scores one (layer, dose) with a judge: the trait's eval prompt and the coherence prompt on the steered
    greedy answers to the held-out questions (0-100 each; answers the judge cannot score are left out)."""

    judge: object = None  # persona.judges.Judge
    trait_prompt: Callable[[str, str], str] | None = None  # (question, answer) -> the filled eval prompt

    def judged(self, answers: Sequence[list[int]]) -> tuple[float, float, str]:
        from persona.core.errors import MissedResult
        from persona.data.traits import coherence_prompt

        texts = [self.tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
        pairs = list(zip(self.questions, texts, strict=True))
        means = []
        for fill in (self.trait_prompt, coherence_prompt):
            scores = [
                s.score for s in self.judge.score([fill(q, a) for q, a in pairs]) if s.score is not None
            ]
            if not scores:
                raise MissedResult(
                    "the judge scored none of the calibration answers. Fix: a judge that answers with numbers "
                    "(or calibrate without --judge_model: judge-free proxies)."
                )
            means.append(sum(scores) / len(scores))
        return means[0], means[1], texts[0]

    def unsteered_trait(self) -> float:
        return self.judged(greedy_answers(self.lm, self.tokenizer, self.prompts, [], self.max_tokens))[0]

    def __call__(self, layer: int, dose: float) -> dict:
        coef = self.coef(layer, dose)
        specs = [SteeringSpec(layer, self.vector, coef)]
        trait, coherence, sample = self.judged(
            greedy_answers(self.lm, self.tokenizer, self.prompts, specs, self.max_tokens)
        )
        return {
            "layer": layer, "dose": dose, "coef": coef, "coherence": coherence, "trait": trait,
            "nll": float("nan"), "nll_unsteered": float("nan"), "sample_answer": sample[:200],
        }  # fmt: skip
