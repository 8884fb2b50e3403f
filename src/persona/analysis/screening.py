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
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from persona.data.examples import Example, format_prompt
from persona.data.scored_files import read_scored_file
from persona.hardware import resolve_device
from persona.models import DEFAULT_MODEL, load_model, load_tokenizer, model_dimensions
from persona.projection import score_examples
from persona.steering import generate_steered
from persona.store import KeyedJournal, write_csv, write_figure, write_text
from persona.vectors import load_vector

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
    model: torch.nn.Module,
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


def check_vector_and_layer(model: str, vector_path: str, layer: int, *, trust_remote_code: bool = False):
    """The vector row at ``layer`` [hidden], checked against the model's config (no weights loaded)."""
    hidden_size, num_layers = model_dimensions(model, trust_remote_code=trust_remote_code)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= num_layers:
        raise ValueError(
            f"--layer {layer!r} is out of range for {model} with {num_layers} blocks. "
            f"Fix: choose 0..{num_layers} (0 = embeddings, L = output of block L-1)."
        )
    vector = load_vector(vector_path, hidden_size=hidden_size, num_layers=num_layers)
    if float(vector[layer].norm()) == 0.0:
        raise ValueError(
            f"{vector_path}: row {layer} is all zeros (no direction). Fix: choose another --layer."
        )
    return vector[layer]


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


def write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    write_text(path, text)


def _float_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def screen(
    data: str,
    vector_path: str,
    layer: int,
    model: str = DEFAULT_MODEL,
    top: int | None = None,
    filtered_out: str | None = None,
    filter_top: float | None = None,
    cheap: bool = False,
    max_new_tokens: int = 128,
    output: str | None = None,
    labels_field: str | None = None,
    cache_path: str | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    accelerator: str = "auto",
    trust_remote_code: bool = False,
) -> dict:
    """Score each training sample by how far its response pushes the model along a persona vector.

    Score = (a(x, y_train) - a(x, y_base)) · v̂, a = mean response-token activation at --layer, y_base
    = the model's own greedy response (cached). Writes <data>.screened.jsonl (or --output) with a
    persona_screen field per sample, <output stem>.ranking.csv (rank, index, score, prompt),
    <output stem>.summary.csv (dataset mean, AUC) and <output stem>.hist.png.

    Args:
        data: Chat JSONL, one {"messages": [..., {"role": "assistant", ...}]} per line.
        vector_path: Vector file [num_layers+1, hidden] from `persona extract` (response_avg recommended).
        layer: Layer to read (0 = embeddings, L = output of block L-1).
        model: The base model (before fine-tuning): alias, hub id or local path.
        top: Print the K highest-scoring samples.
        filtered_out: Write a copy of the data without the highest-scoring samples here.
        filter_top: With --filtered_out: how many to drop, a fraction in (0, 1) or a count; default --top.
        cheap: No generation: training-response projection minus last-prompt-token projection.
        max_new_tokens: Length of the greedy base responses.
        output: Where to write the scored copy; default <data>.screened.jsonl.
        labels_field: A 0/1 field of every sample (e.g. is_trait): prints the AUC of the score for it.
        cache_path: Greedy-response cache; default <data>.base_responses.jsonl.
        batch_size: Examples per forward / generation batch.
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: cpu, gpu or auto (the GPU when there is one).
        trust_remote_code: Allow custom model code from the hub.
    """
    path = Path(data)
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{path}: screening reads chat JSONL (messages). Fix: convert the file to .jsonl.")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("--batch_size and --max_new_tokens must be >= 1.")
    records = read_scored_file(path)  # exists, messages present, last message an assistant string
    labels = check_labels(path, records, labels_field) if labels_field else None
    n_drop = drop_count(filter_top, top, len(records)) if filtered_out else 0
    direction = check_vector_and_layer(model, vector_path, layer, trust_remote_code=trust_remote_code)
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
    train_examples = [
        Example(p, r, 0, f"{path.name}:{i}")
        for i, (p, r) in enumerate(zip(prompt_texts, responses, strict=True), 1)
    ]
    if cheap:
        method = "cheap: response_avg(train) - prompt_last"
        found = score_examples(
            net,
            tokenizer,
            train_examples,
            layer,
            direction,
            ("response_avg", "prompt_last"),
            batch_size=batch_size,
            accelerator=accelerator,
        )
        train_proj, reference = found["response_avg"], found["prompt_last"]
    else:
        method = "projection_difference: response_avg(train) - response_avg(base greedy)"
        cache = Path(cache_path) if cache_path else path.with_name(path.stem + ".base_responses.jsonl")
        base_responses = cached_greedy_responses(
            net,
            tokenizer,
            prompts,
            model_name=model,
            cache_path=cache,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        base_examples = [
            Example(p, r, 0, f"{path.name}:{i}:base")
            for i, (p, r) in enumerate(zip(prompt_texts, base_responses, strict=True), 1)
        ]
        found = score_examples(
            net,
            tokenizer,
            train_examples + base_examples,
            layer,
            direction,
            ("response_avg",),
            batch_size=batch_size,
            accelerator=accelerator,
        )["response_avg"]
        train_proj, reference = found[: len(records)], found[len(records) :]
    del net
    scores = train_proj - reference

    out_path = Path(output) if output else path.with_name(path.stem + ".screened.jsonl")
    stem = out_path.with_suffix("")
    screened = []
    for record, score, train_value, reference_value in zip(
        records, scores, train_proj, reference, strict=True
    ):
        screened.append(
            {
                **record,
                "persona_screen": {
                    "score": _float_or_none(score),
                    "method": "cheap" if cheap else "projection_difference",
                    "layer": layer,
                    "vector": str(vector_path),
                    "model": model,
                    "train_projection": _float_or_none(train_value),
                    ("prompt_last_projection" if cheap else "base_projection"): _float_or_none(
                        reference_value
                    ),
                },
            }
        )
    write_jsonl(out_path, screened)

    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    ranking = pd.DataFrame(
        {
            "rank": np.arange(1, len(records) + 1),
            "index": order,
            "score": scores[order],
            "prompt": [prompt_preview(prompts[i]) for i in order],
        }
    )
    if labels is not None:
        ranking[labels_field] = labels[order]
    ranking_path = Path(f"{stem}.ranking.csv")
    write_csv(ranking_path, ranking)

    scored = ~np.isnan(scores)
    mean_score = float(scores[scored].mean()) if scored.any() else float("nan")
    summary = {
        "data": str(path),
        "output": str(out_path),
        "model": model,
        "vector": str(vector_path),
        "layer": layer,
        "method": "cheap" if cheap else "projection_difference",
        "n": len(records),
        "n_scored": int(scored.sum()),
        "mean_score": mean_score,
        "std_score": float(scores[scored].std(ddof=1)) if scored.sum() > 1 else float("nan"),
    }
    print(f"{path}: {method} at layer {layer}")
    print(f"dataset mean score: {mean_score:.4f} over {int(scored.sum())} of {len(records)} samples")
    if int((~scored).sum()):
        print(f"note: {int((~scored).sum())} sample(s) have no score (an empty response).")
    if labels is not None:
        from sklearn.metrics import roc_auc_score

        if len(set(labels[scored].tolist())) < 2:
            raise ValueError(
                f"{path}: the scored samples have only one {labels_field!r} value; AUC is undefined."
            )
        auc = float(roc_auc_score(labels[scored], scores[scored]))
        summary.update({"labels_field": labels_field, "auc": auc})
        print(f"AUC of the score for {labels_field}=1: {auc:.3f}")
    summary_path = Path(f"{stem}.summary.csv")
    write_csv(summary_path, pd.DataFrame([summary]))
    hist_path = Path(f"{stem}.hist.png")
    if scored.any():
        plot_histogram(
            scores,
            labels,
            hist_path,
            f"{path.name}: {summary['method']}, layer {layer}",
            labels_field or "label",
        )
    if top:
        print(ranking.head(top).to_string(index=False))
    if filtered_out:
        dropped = rows_to_drop(scores, n_drop)
        kept = [record for index, record in enumerate(records) if index not in dropped]
        write_jsonl(Path(filtered_out), kept)
        print(f"filtered copy without the top {len(dropped)} sample(s): {filtered_out} ({len(kept)} kept)")
    print(f"scored copy: {out_path}\nranking: {ranking_path}\nsummary: {summary_path}")
    return {
        "output": str(out_path),
        "ranking": str(ranking_path),
        "summary": str(summary_path),
        "histogram": str(hist_path),
        "mean_score": mean_score,
        "auc": summary.get("auc"),
    }
