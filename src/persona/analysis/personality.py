"""Judge-free personality scores on TRAIT-format items (Lee et al. 2024), optionally swept over steering.

Each item is a situation, a query and four responses: two that show the trait (high) and two that
don't (low). An item's score is in [0, 1] (0.5 = no preference); a trait's score is the mean over items.

- ``likelihood``: the per-token mean log-likelihood ``m`` of each response given the chat-formatted
  "situation query" user turn; score = ``softmax(m_high1, m_high2, m_low1, m_low2)`` summed over the two
  high responses. The per-token mean is the log of the geometric-mean token probability, so long and
  short responses compete fairly; the softmax keeps the score continuous (a 0/1 "mean(high) > mean(low)"
  would quantise a 10-item test set into steps of 0.1). That indicator is kept per item as ``high_preferred``.
- ``choice``: TRAIT's multiple-choice format — situation, query, options A-D, asked for the letter. Score =
  P(high letters) / P(all four letters) at the first answer position, averaged over two option orders
  (high responses as A, B; then as C, D), which cancels a pure letter/position bias exactly.

``persona personality`` sweeps steering coefficients (the vector added at every position of one layer)
and writes ``personality_sweep.csv`` (trait, method, coef, score, sem, n), per-item scores and a PNG.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from persona.analysis.likelihood import response_mean_logprobs
from persona.core.hardware import input_device
from persona.core.store import write_figure
from persona.data.batches import left_pad
from persona.data.chat import has_chat_template, render_chat, user_turn
from persona.data.examples import Example
from persona.steering import SteeringSpec, steer

log = logging.getLogger(__name__)

METHODS = ("likelihood", "choice")
LETTERS = ("A", "B", "C", "D")
HIGH_FIRST = ("response_high1", "response_high2", "response_low1", "response_low2")
LOW_FIRST = ("response_low1", "response_low2", "response_high1", "response_high2")
CHOICE_TEMPLATE = (
    "{situation}\n{query}\n\n"
    "Which of these responses is most like what you would do or say?\n"
    "A. {A}\nB. {B}\nC. {C}\nD. {D}\n\n"
    "Answer with a single letter: A, B, C or D."
)


def chat_prompt(tokenizer, user_text: str) -> str:
    """One user turn through the chat template (a chat model is required: the options are turns of a chat)."""
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} has no chat template. "
            "Fix: use an instruct/chat model."
        )
    return render_chat(tokenizer, user_turn(user_text))


def situation_prompt(item: dict) -> str:
    """The user turn of the likelihood method: as in :func:`persona.data.personality.trait_items_as_pairs`."""
    return f"{item['situation'].strip()} {item['query'].strip()}"


def choice_prompt(item: dict, order: Sequence[str] = HIGH_FIRST) -> str:
    options = {letter: item[field].strip() for letter, field in zip(LETTERS, order, strict=True)}
    return CHOICE_TEMPLATE.format(situation=item["situation"].strip(), query=item["query"].strip(), **options)


# --------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def likelihood_item_scores(
    model, tokenizer, items: Sequence[dict], *, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """``score`` [n] = P(high) from a softmax over the four per-token mean log-likelihoods; also
    ``logprobs`` [n, 4] (high1, high2, low1, low2) and ``high_preferred`` [n] (mean high > mean low)."""
    examples = []
    for item in items:
        prompt = chat_prompt(tokenizer, situation_prompt(item))
        examples += [
            Example(prompt, item[field], int("high" in field), f"{item.get('item')}:{field}")
            for field in HIGH_FIRST
        ]
    logprobs = response_mean_logprobs(model, tokenizer, examples, batch_size=batch_size).view(len(items), 4)
    return {
        "score": torch.softmax(logprobs.double(), dim=-1)[:, :2].sum(-1).float(),
        "logprobs": logprobs,
        "high_preferred": (logprobs[:, :2].mean(-1) > logprobs[:, 2:].mean(-1)).float(),
    }


def letter_token_ids(tokenizer) -> list[list[int]]:
    """Per letter A-D, the single-token spellings ("A" and " A" where each is one token) to sum over."""
    ids = []
    for letter in LETTERS:
        variants = [tokenizer.encode(text, add_special_tokens=False) for text in (letter, f" {letter}")]
        singles = sorted({v[0] for v in variants if len(v) == 1})
        if not singles:
            raise ValueError(
                f"The tokenizer has no single token for the option letter {letter!r}. "
                "Fix: use --method likelihood with this model."
            )
        ids.append(singles)
    flat = [i for group in ids for i in group]
    if len(flat) != len(set(flat)):
        raise ValueError("Two option letters share a token in this tokenizer. Fix: use --method likelihood.")
    return ids


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8) -> torch.Tensor:
    """Log-probabilities of the token after each prompt: [len(prompts), vocab].

    Left-padded with explicit position ids (so a padded row sees the same positions as alone) and only
    the last position's logits computed (``logits_to_keep=1``), which saves a [batch, seq, vocab] tensor.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    device = input_device(model)
    rows = []
    for start in range(0, len(encoded), batch_size):
        input_ids, attention_mask = left_pad(encoded[start : start + batch_size], pad_id)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=1,
        ).logits[:, -1]
        rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)


def letter_probabilities(logprobs: torch.Tensor, letter_ids: list[list[int]]) -> torch.Tensor:
    """[n, vocab] log-probs -> [n, 4] probability of each option letter (its spellings summed)."""
    probs = logprobs.double().exp()
    return torch.stack([probs[:, ids].sum(-1) for ids in letter_ids], dim=-1)


def choice_item_scores(
    model, tokenizer, items: Sequence[dict], *, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """``score`` [n] = mean over the two option orders of P(high letters) / P(A-D); also ``high_first``,
    ``low_first`` (each order's share) and ``letter_mass`` (P(A-D) of all next tokens, averaged)."""
    letter_ids = letter_token_ids(tokenizer)
    prompts = [
        chat_prompt(tokenizer, choice_prompt(item, order))
        for order in (HIGH_FIRST, LOW_FIRST)
        for item in items
    ]
    letters = letter_probabilities(
        next_token_logprobs(model, tokenizer, prompts, batch_size=batch_size), letter_ids
    )
    letters = letters.view(2, len(items), 4)
    mass = letters.sum(-1)
    high_first = letters[0, :, :2].sum(-1) / mass[0]  # high responses are A and B
    low_first = letters[1, :, 2:].sum(-1) / mass[1]  # high responses are C and D
    return {
        "score": ((high_first + low_first) / 2).float(),
        "high_first": high_first.float(),
        "low_first": low_first.float(),
        "letter_mass": mass.mean(0).float(),
    }


SCORERS = {"likelihood": likelihood_item_scores, "choice": choice_item_scores}


def personality_sweep(
    model,
    tokenizer,
    items_by_trait: dict[str, list[dict]],
    vectors: dict[str, torch.Tensor | None],
    layer: int,
    coefs: Sequence[float] | None = None,
    methods: Sequence[str] = METHODS,
    *,
    batch_size: int = 8,
    doses: Sequence[float] | None = None,
    norm: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: trait, method, coef, dose, score, sem, n; per-item scores) with ``vectors[trait]`` [hidden] or
    [num_layers + 1, hidden] added at ``layer`` at every position times each coefficient — or, with ``doses``
    and the layer's mean residual ``norm``, at each dose (each trait's coefficient from its own vector's norm, so
    every trait gets the same push relative to the residual stream). ``dose`` is NaN without ``norm``."""
    summary, per_item = [], []
    for trait, items in items_by_trait.items():
        vector = vectors.get(trait)
        for coef, dose in sweep_points(trait, vector, layer, coefs, doses, norm):
            specs = [] if vector is None else [SteeringSpec(layer, vector, coef, positions="all")]
            with steer(model, specs):
                for method in methods:
                    scores = SCORERS[method](model, tokenizer, items, batch_size=batch_size)
                    point = {"trait": trait, "method": method, "coef": float(coef), "dose": dose}
                    summary.append({**point, **score_summary(scores["score"].double())})
                    per_item += item_rows(point, items, scores)
            print(
                f"{trait} coef {coef:.4g} (dose {dose:.4g}): "
                + ", ".join(f"{row['method']} {row['score']:.3f}" for row in summary[-len(methods) :]),
                flush=True,
            )
    return pd.DataFrame(summary), pd.DataFrame(per_item)


def sweep_points(trait, vector, layer, coefs, doses, norm) -> list[tuple[float, float]]:
    """``(coef, dose)`` of each point of one trait's sweep; a coefficient needs a vector unless it is 0."""
    from persona.vectors.dose import coef_to_dose, dose_to_coef

    direction = None if vector is None else (vector if vector.dim() == 1 else vector[layer])
    if doses is not None:
        if any(d != 0 for d in doses) and (direction is None or norm is None):
            raise ValueError(f"Trait {trait!r}: a dose needs its vector and the layer's residual norm.")
        return [(0.0 if d == 0 else dose_to_coef(d, direction, norm), float(d)) for d in doses]
    if direction is None and any(c != 0 for c in coefs):
        raise ValueError(
            f"Trait {trait!r} has no vector but coefs={list(coefs)}. Fix: give a vector or use coef 0."
        )
    known = direction is not None and norm is not None
    return [(float(c), coef_to_dose(c, direction, norm) if known else float("nan")) for c in coefs]


def score_summary(values: torch.Tensor) -> dict:
    sem = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"score": float(values.mean()), "sem": sem, "n": len(values)}


def item_rows(point: dict, items: list[dict], scores: dict) -> list[dict]:
    extra = {k: v.tolist() for k, v in scores.items() if k not in ("score", "logprobs")}
    values = scores["score"].double()
    return [
        {**point, "item": item["item"], "score": float(values[i]), **{k: v[i] for k, v in extra.items()}}
        for i, item in enumerate(items)
    ]


def plot_personality_sweep(frame: pd.DataFrame, path: Path, title: str = "", x: str = "coef") -> None:
    """Score vs coefficient (or dose), one line per trait, one panel per method (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = [m for m in METHODS if m in set(frame["method"])]
    figure = Figure(figsize=(5.5 * len(methods), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(methods), squeeze=False)[0]
    for axis, method in zip(axes, methods, strict=True):
        for trait, rows in frame[frame["method"] == method].groupby("trait", sort=True):
            rows = rows.sort_values(x)
            axis.errorbar(
                rows[x], rows["score"], yerr=rows["sem"].fillna(0), marker="o", capsize=3, label=trait
            )
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel(f"steering {'dose' if x == 'dose' else 'coefficient'} (all positions)")
        axis.set_ylabel("trait score (P(high response))")
        axis.set_title(method)
        axis.legend(loc="best", fontsize="small")
    if title:
        figure.suptitle(title)
    write_figure(path, figure, dpi=120)
