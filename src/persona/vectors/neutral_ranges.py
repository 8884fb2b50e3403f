"""The neutral texts' projection percentiles: the range ordinary text occupies on a vector, per layer.

Extraction records them in the sidecar (``neutral_projection_percentiles``) from one extra small batched pass over
the built-in neutral texts (:mod:`persona.vectors.neutral`); an older file gets them measured once with the model
on first use and cached beside it (``<stem>.neutral.json``, keyed by the texts, the model, the vector file's content
and its kind), exactly as the residual norms are. A bound reads them as ``"neutral:p99"``
(:func:`persona.vectors.ranges.resolve_bound`).

Against the negative examples' percentiles (``"p99"``): those are the trait-free *answers to the trait's own
questions*, chat-formatted, so they say how far a kind reply to a provoking question goes; the neutral texts are
everyday sentences with no question behind them, so they say where text that has nothing to do with the trait sits.
"""

from __future__ import annotations

from pathlib import Path

from persona.vectors.files import load_metadata, load_vector
from persona.vectors.neutral import NEUTRAL_TEXTS, file_digest, model_to_measure, neutral_texts, write_cache
from persona.vectors.ranges import (
    NEUTRAL_KEY,
    PROJECTION_PERCENTILES,
    file_kind,
    percentile_record,
    stored_neutral,
)

REDUCTIONS = {
    "response_avg": "mean over the text's tokens but its first",
    "prompt_avg": "mean over the text's tokens but its first",
    "prompt_last": "the text's last token",
}
"""How a neutral text becomes one activation per layer, by the vector file's kind. An ``*_avg`` vector is a
difference of per-example token means, so its texts are token means too; the first token is left out because it
is an attention sink (norm ~100x the rest, see :func:`persona.vectors.norms.mean_residual_norm`) that would only
add a length-dependent offset. A ``prompt_last`` vector reads the last token, so its texts do too."""


def neutral_record(lm, tokenizer, vectors: dict) -> dict[str, dict]:
    """``{kind: sidecar record}`` for ``vectors {kind: [num_layers + 1, hidden]}`` from one batched pass over the
    neutral texts (every kind and layer at once): per layer, the percentiles of each text's activation
    (:data:`REDUCTIONS`) projected on that layer's unit vector."""
    import torch

    from persona.hooks import locate_blocks
    from persona.vectors.activations import text_means

    texts = neutral_texts()
    layers = list(range(locate_blocks(lm).num_layers + 1))
    training = lm.training
    lm.eval()  # dropout off: a model mid fine-tuning is measured as it answers
    try:
        means = text_means(lm, tokenizer, texts, layers, list(vectors))
    finally:
        lm.train(training)
    quantiles = torch.tensor(PROJECTION_PERCENTILES, dtype=torch.float64) / 100
    records = {}
    for kind, vector in vectors.items():
        vector = torch.as_tensor(vector).double()
        unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        projections = torch.einsum("nlh,lh->nl", means[kind].double().cpu(), unit.cpu())
        table = torch.quantile(projections, quantiles, dim=0).T.tolist()
        of = f"each neutral text's activation ({REDUCTIONS[kind]}) projected on the unit vector of its layer"
        records[kind] = {
            **percentile_record(table, of=of),
            "texts": NEUTRAL_TEXTS.name,
            "n_texts": len(texts),
        }
    return records


def neutral_percentiles(
    vector_path: str | Path, *, model: str | None, lm=None, tokenizer=None, flag: str = "--model"
) -> dict:
    """The vector file's neutral projection percentiles: stored (sidecar or cache), else measured and cached.

    Measuring needs the model: ``lm`` + ``tokenizer`` when loaded, else ``model`` (a name) is loaded here.
    """
    meta = load_metadata(vector_path)
    record = stored_neutral(vector_path, meta, model)
    if record is not None:
        return record
    lm, tokenizer = model_to_measure(vector_path, NEUTRAL_KEY, model=model, lm=lm, tokenizer=tokenizer, flag=flag,
                                     why="extracted before persona recorded them")  # fmt: skip
    kind = file_kind(vector_path, meta)
    record = neutral_record(lm, tokenizer, {kind: load_vector(vector_path)})[kind]
    key = {"vector_sha256": file_digest(vector_path), "kind": kind}
    write_cache(vector_path, "neutral", NEUTRAL_KEY, record, model=model, key=key)
    return record
