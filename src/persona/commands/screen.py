"""``persona screen``: score training samples by how far their responses push the model along a persona vector."""

from __future__ import annotations

from pathlib import Path

from persona.analysis.screening import (
    check_labels,
    check_screened_conversation,
    drop_count,
    plot_histogram,
    ranking_table,
    rows_to_drop,
    screened_records,
    screening_scores,
    screening_summary,
    write_jsonl,
)
from persona.core import checks
from persona.core.errors import PersonaError
from persona.core.store import write_csv
from persona.data.chat_dataset import CHAT_SUFFIXES, is_hub_id, read_chat_records
from persona.models import DEFAULT_MODEL, model_source
from persona.vectors import vector_for_model


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
    output_path: str | None = None,
    labels_field: str | None = None,
    cache_path: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    dtype: str = "float32",
    accelerator: str = "auto",
    trust_remote_code: bool = False,
) -> dict:
    """Score each training sample by how far its response pushes the model along a persona vector.

    Score = (a(x, y_train) - a(x, y_base)) · v̂, a = mean response-token activation at --layer, y_base
    = the model's own greedy response (cached). Writes <data>.screened.jsonl (or --output_path) with a
    persona_screen field per sample, <output stem>.ranking.csv (rank, index, score, prompt),
    <output stem>.summary.csv (dataset mean, AUC) and <output stem>.hist.png.

    Args:
        data: Chat data, each conversation ending with the response to score: a JSONL file (one {"messages":
            [..., {"role": "assistant", ...}]} per line), a Parquet file with a messages column, a directory of
            them, or a hub dataset id (org/name or org/name:split; offline, from the local cache).
        vector_path: Vector file [num_layers+1, hidden] from `persona extract` (response_avg recommended).
        layer: Layer to read (0 = embeddings, L = output of block L-1).
        model: The base model (before fine-tuning): alias, hub id or local path.
        top: Print the K highest-scoring samples.
        filtered_out: Write a copy of the data without the highest-scoring samples here.
        filter_top: With --filtered_out: how many to drop, a fraction in (0, 1) or a count; default --top.
        cheap: No generation: training-response projection minus last-prompt-token projection.
        max_new_tokens: Length of the greedy base responses.
        output_path: Where to write the scored copy; default <data>.screened.jsonl (alias --output); needed for a hub id.
        labels_field: A 0/1 field of every sample (e.g. is_trait): prints the AUC of the score for it.
        cache_path: Greedy-response cache; default <data>.base_responses.jsonl, for a hub id beside the output (reused and extended).
        batch_size: Examples per forward / generation batch.
        overwrite: Replace outputs that already exist.
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: cpu, gpu or auto (the GPU when there is one).
        trust_remote_code: Allow custom model code from the hub.
    """
    path = Path(data)
    if path.is_file() and path.suffix.lower() not in CHAT_SUFFIXES:
        raise PersonaError(
            f"--data {path}: screening reads chat JSONL or Parquet (messages). Fix: convert the file to .jsonl."
        )
    if is_hub_id(data, "--data") and not output_path:  # no folder of the user's to write beside
        raise PersonaError(
            f"--data {data}: not a local file or directory, so the outputs have no default place. "
            "Fix: pass --output_path (e.g. screened/data.screened.jsonl)."
        )
    checks.run_settings(batch_size=batch_size, dtype=dtype)
    checks.at_least(max_new_tokens, 1, "--max_new_tokens")
    checks.input_file(vector_path, "--vector_path", what="vector file")
    model_source(model)
    out_path = Path(output_path) if output_path else path.with_name(path.stem + ".screened.jsonl")
    stem = out_path.with_suffix("")
    outputs = {"--output_path": out_path, **{f"--output_path ({s})": Path(f"{stem}.{s}") for s in SUFFIXES}}
    if filtered_out:
        outputs["--filtered_out"] = Path(filtered_out)
    inputs = {"--data": path, "--vector_path": vector_path, "--cache_path": cache_path}
    for flag, target in outputs.items():
        checks.output_file(target, flag, inputs=inputs, overwrite=overwrite)
    records = read_chat_records(data, "--data", check_screened_conversation)
    labels = check_labels(path, records, labels_field) if labels_field else None
    n_drop = drop_count(filter_top, top, len(records)) if filtered_out else 0
    if n_drop >= len(records):
        raise PersonaError(
            f"--filter_top {filter_top if filter_top is not None else top}: drops {n_drop} of {len(records)} samples, "
            "leaving an empty file. Fix: drop fewer."
        )
    vector = vector_for_model(model, vector_path, layers=[layer], trust_remote_code=trust_remote_code)

    cache = Path(cache_path) if cache_path else default_cache(path, out_path)
    scores, train_proj, reference = screening_scores(
        records,
        path,
        model=model,
        layer=layer,
        direction=vector[layer],
        cheap=cheap,
        max_new_tokens=max_new_tokens,
        cache_path=cache,
        batch_size=batch_size,
        dtype=dtype,
        accelerator=accelerator,
        trust_remote_code=trust_remote_code,
    )
    screened = screened_records(
        records, scores, train_proj, reference, cheap=cheap, layer=layer, vector_path=vector_path, model=model
    )
    facts = dict(data=str(path), output=str(out_path), model=model, vector=str(vector_path), layer=layer)
    summary = write_outputs(screened, scores, labels, labels_field, stem, facts, cheap=cheap, top=top)
    if filtered_out:
        dropped = rows_to_drop(scores, n_drop)
        kept = [record for index, record in enumerate(records) if index not in dropped]
        write_jsonl(Path(filtered_out), kept)
        print(f"filtered copy without the top {len(dropped)} sample(s): {filtered_out} ({len(kept)} kept)")
    return summary


def write_outputs(
    screened, scores, labels, labels_field, stem: Path, facts: dict, *, cheap: bool, top
) -> dict:
    """The scored copy, the ranking, the summary and the histogram; returns where they went and the headline."""
    import pandas as pd

    method = "cheap" if cheap else "projection_difference"
    write_jsonl(Path(facts["output"]), screened)
    ranking = ranking_table(scores, screened, labels, labels_field)
    write_csv(f"{stem}.ranking.csv", ranking)
    summary = screening_summary(scores, labels, labels_field, **facts, method=method)
    write_csv(f"{stem}.summary.csv", pd.DataFrame([summary]))
    if summary["n_scored"]:
        title = f"{Path(facts['data']).name}: {method}, layer {facts['layer']}"
        plot_histogram(scores, labels, Path(f"{stem}.hist.png"), title, labels_field or "label")
    report(summary, ranking, top, Path(facts["data"]), method)
    print(f"scored copy: {facts['output']}\nranking: {stem}.ranking.csv\nsummary: {stem}.summary.csv")
    return {
        "output": facts["output"],
        "ranking": f"{stem}.ranking.csv",
        "summary": f"{stem}.summary.csv",
        "histogram": f"{stem}.hist.png",
        "mean_score": summary["mean_score"],
        "auc": summary.get("auc"),
    }


SUFFIXES = ("ranking.csv", "summary.csv", "hist.png")


def default_cache(data: Path, out_path: Path) -> Path:
    """``<data>.base_responses.jsonl`` beside local data; beside the output for a hub dataset."""
    if data.exists():
        return data.with_name(data.stem + ".base_responses.jsonl")
    return out_path.with_name(out_path.stem.removesuffix(".screened") + ".base_responses.jsonl")


def report(summary: dict, ranking, top: int | None, path: Path, method: str) -> None:
    unscored = summary["n"] - summary["n_scored"]
    print(f"{path}: {method} at layer {summary['layer']}")
    print(
        f"dataset mean score: {summary['mean_score']:.4f} over {summary['n_scored']} of {summary['n']} samples"
    )
    if unscored:
        print(f"note: {unscored} sample(s) have no score (an empty response).")
    if "auc" in summary:
        print(f"AUC of the score for {summary['labels_field']}=1: {summary['auc']:.3f}")
    if top:
        print(ranking.head(top).to_string(index=False))
