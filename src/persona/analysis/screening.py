"""Screen training data before fine-tuning by projection difference (paper §6): `persona screen`.

Per sample, ``ΔP = (a(x, y_train) - a(x, y_base)) · v̂``: ``a`` is the mean residual activation over
response tokens at layer L, ``y_train`` the dataset's response, ``y_base`` the base model's own greedy
response to the same prompt and ``v̂`` the unit persona vector. A high ΔP means the training response
pushes the model along the trait further than what it would say anyway. ``--cheap`` skips generation:
training-response projection minus last-prompt-token projection, from one forward.

Greedy base responses are cached in a sidecar JSONL keyed by a hash of (model, generation length,
prompt messages), so re-runs and other datasets with the same prompts generate nothing. The same cache
serves the finetuning shift (:mod:`persona.analysis.shift`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from persona.core.hardware import resolve_device
from persona.core.store import KeyedJournal, write_figure
from persona.core.store import (
    write_jsonl as write_jsonl,  # re-exported: commands/screen.py imports it from here
)
from persona.data.conversations import _checked_messages
from persona.data.examples import Example, format_prompt
from persona.models import load_model, load_tokenizer

Messages = list[dict]
PROMPT_PREVIEW_CHARS = 80


# ---------------------------------------------------------------------------------------------------
# Greedy base responses, cached by prompt hash.


def response_key(model: str, messages: Messages, max_new_tokens: int) -> str:
    """Cache key of a greedy response: the model and generation length matter as much as the prompt."""
    payload = json.dumps(
        {"model": model, "max_new_tokens": max_new_tokens, "messages": messages},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def cached_greedy_responses(
    model,
    tokenizer,
    prompts: Sequence[Messages],
    *,
    model_name: str,
    cache_path: str | Path,
    max_new_tokens: int,
    batch_size: int = 8,
    chunk_size: int = 64,
) -> list[str]:
    """The model's greedy response to each prompt (message list), generating only what the cache lacks.

    New responses are appended to the journal every ``chunk_size`` prompts, so an interrupted run resumes.
    """
    from persona.steering import generate_steered

    journal = KeyedJournal(cache_path, ("key",))
    cache = {key: row for (key,), row in journal.load().items()}
    keys = [response_key(model_name, list(messages), max_new_tokens) for messages in prompts]
    missing = {key: list(messages) for key, messages in zip(keys, prompts, strict=True) if key not in cache}
    todo = list(missing.items())
    if todo:
        print(
            f"generating {len(todo)} greedy base response(s) ({len(set(keys)) - len(todo)} of the "
            f"{len(set(keys))} distinct prompts cached in {journal.path})"
        )
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        texts = generate_steered(
            model,
            tokenizer,
            [messages for _, messages in chunk],
            (),
            max_new_tokens=max_new_tokens,
            temperature=0,
            batch_size=batch_size,
        )
        rows = [
            {
                "key": key,
                "model": model_name,
                "max_new_tokens": max_new_tokens,
                "messages": messages,
                "response": text,
            }
            for (key, messages), text in zip(chunk, texts, strict=True)
        ]
        journal.append(rows)
        cache.update((row["key"], row) for row in rows)
    return [cache[key]["response"] for key in keys]


# ---------------------------------------------------------------------------------------------------
# Validation (all before the model loads).


def check_labels(path: Path, records: list[dict], field: str) -> np.ndarray:
    labels = []
    for line, record in enumerate(records, start=1):
        value = record.get(field)
        if isinstance(value, bool) or value in (0, 1):
            labels.append(int(value))
        else:
            raise ValueError(
                f"{path}: record {line}: --labels_field {field!r} is {value!r}; it must be 0/1 (or true/false) "
                "in every record. Fix: label every sample or drop --labels_field."
            )
    labels = np.array(labels)
    if labels.min() == labels.max():
        raise ValueError(f"{path}: every {field!r} is {labels[0]}; AUC needs both labels.")
    return labels


def check_screened_conversation(record, where: str) -> None:
    """The conversation checks of training data (the one validator), then what screening adds: the last message
    is the assistant's response to score, after at least one prompt message."""
    messages = _checked_messages(record, where)
    last = messages[-1]
    if len(messages) < 2 or last["role"] != "assistant":
        raise ValueError(
            f"{where}: the last message must be {{'role': 'assistant', 'content': str}} after at least one prompt "
            f"message (the response to score); found {str(last)[:80]!r}. Fix: end each conversation with "
            "the assistant's response."
        )


def prompt_preview(messages: Messages) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    text = str(users[-1] if users else messages[-1].get("content", ""))
    return " ".join(text.split())[:PROMPT_PREVIEW_CHARS]


# ---------------------------------------------------------------------------------------------------
# Outputs.


def rows_to_drop(scores: np.ndarray, count: int) -> set[int]:
    """Indices of the ``count`` highest scores (NaN never counts as high)."""
    order = [
        int(i)
        for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
        if not np.isnan(scores[i])
    ]
    return set(order[:count])


def drop_count(filter_top: float | None, top: int | None, n: int) -> int:
    value = filter_top if filter_top is not None else top
    if value is None:
        raise ValueError(
            "--filtered_out needs --filter_top (a fraction in (0, 1) or a count >= 1) or --top K."
        )
    if 0 < value < 1:
        return int(math.ceil(value * n))
    if value >= 1 and float(value).is_integer():
        return int(value)
    raise ValueError(f"--filter_top {value}: give a fraction in (0, 1) or a whole count >= 1.")


def plot_histogram(
    scores: np.ndarray, labels: np.ndarray | None, path: Path, title: str, labels_field: str = "label"
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    keep = ~np.isnan(scores)
    bins = np.histogram_bin_edges(scores[keep], bins=min(30, max(5, int(keep.sum()) // 2)))
    if labels is None:
        axes.hist(scores[keep], bins=bins, color="tab:blue", alpha=0.8)
    else:
        for value, color in ((0, "tab:blue"), (1, "tab:red")):
            axes.hist(
                scores[keep & (labels == value)],
                bins=bins,
                color=color,
                alpha=0.6,
                label=f"{labels_field} = {value}",
            )
        axes.legend(loc="best")
    axes.set_xlabel("screening score (projection difference)")
    axes.set_ylabel("samples")
    axes.set_title(title, fontsize=9)
    write_figure(path, figure, dpi=120)


def _float_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def screening_scores(
    records: list[dict],
    path: Path,
    *,
    model: str,
    layer: int,
    direction,
    cheap: bool,
    max_new_tokens: int,
    cache_path: Path,
    batch_size: int,
    dtype: str,
    accelerator: str,
    trust_remote_code: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, train projections, reference projections) per record, float64 with NaN for an empty response.

    Reference = the last prompt token (``cheap``) or the model's own greedy response (cached in
    ``cache_path``, so an interrupted run resumes).
    """
    import torch

    from persona.vectors.projection import score_examples

    tokenizer = load_tokenizer(model, padding_side="right", trust_remote_code=trust_remote_code)
    prompts = [record["messages"][:-1] for record in records]
    prompt_texts = [
        format_prompt(tokenizer, {"messages": p}, where=f"{path}: record {i}")
        for i, p in enumerate(prompts, start=1)
    ]
    responses = [record["messages"][-1]["content"] for record in records]
    net = load_model(
        model, dtype=dtype, device=resolve_device(accelerator), trust_remote_code=trust_remote_code
    )
    net.requires_grad_(False)
    direction = torch.as_tensor(direction)
    train = [
        Example(p, r, 0, f"{path.name}:{i}")
        for i, (p, r) in enumerate(zip(prompt_texts, responses, strict=True), 1)
    ]
    score = partial(
        score_examples,
        net,
        tokenizer,
        layer=layer,
        direction=direction,
        batch_size=batch_size,
        accelerator=accelerator,
    )
    if cheap:
        found = score(train, kinds=("response_avg", "prompt_last"))
        train_proj, reference = found["response_avg"], found["prompt_last"]
    else:
        base_responses = cached_greedy_responses(
            net,
            tokenizer,
            prompts,
            model_name=model,
            cache_path=cache_path,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        base = [
            Example(p, r, 0, f"{path.name}:{i}:base")
            for i, (p, r) in enumerate(zip(prompt_texts, base_responses, strict=True), 1)
        ]
        found = score(train + base, kinds=("response_avg",))["response_avg"]
        train_proj, reference = found[: len(records)], found[len(records) :]
    return train_proj - reference, train_proj, reference


def screened_records(
    records, scores, train_proj, reference, *, cheap: bool, layer: int, vector_path, model
) -> list[dict]:
    """The input records, each with a ``persona_screen`` field (score and the two projections it came from)."""
    method = "cheap" if cheap else "projection_difference"
    reference_field = "prompt_last_projection" if cheap else "base_projection"
    return [
        {
            **record,
            "persona_screen": {
                "score": _float_or_none(score),
                "method": method,
                "layer": layer,
                "vector": str(vector_path),
                "model": model,
                "train_projection": _float_or_none(train_value),
                reference_field: _float_or_none(reference_value),
            },
        }
        for record, score, train_value, reference_value in zip(
            records, scores, train_proj, reference, strict=True
        )
    ]


def ranking_table(scores: np.ndarray, records: list[dict], labels, labels_field) -> pd.DataFrame:
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    ranking = pd.DataFrame(
        {
            "rank": np.arange(1, len(records) + 1),
            "index": order,
            "score": scores[order],
            "prompt": [prompt_preview(records[i]["messages"][:-1]) for i in order],
        }
    )
    if labels is not None:
        ranking[labels_field] = labels[order]
    return ranking


def screening_summary(scores: np.ndarray, labels, labels_field, **facts) -> dict:
    """Dataset mean and spread of the scores, and with labels the AUC of the score for label 1."""
    scored = ~np.isnan(scores)
    summary = {
        **facts,
        "n": len(scores),
        "n_scored": int(scored.sum()),
        "mean_score": float(scores[scored].mean()) if scored.any() else float("nan"),
        "std_score": float(scores[scored].std(ddof=1)) if scored.sum() > 1 else float("nan"),
    }
    if labels is not None:
        from sklearn.metrics import roc_auc_score

        if len(set(labels[scored].tolist())) < 2:
            raise ValueError(
                f"{facts.get('data')}: the scored samples have only one {labels_field!r} value; AUC is undefined."
            )
        summary.update(
            {"labels_field": labels_field, "auc": float(roc_auc_score(labels[scored], scores[scored]))}
        )
    return summary
