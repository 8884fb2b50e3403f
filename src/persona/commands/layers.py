"""``persona layers``: how cleanly each layer separates a trait along its vector; recommends a layer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from persona.analysis.layers import layer_metrics, plot_layer_metrics, recommend_layer
from persona.commands.flags import Batching, Hardware
from persona.core import checks
from persona.core.errors import MissedResult, PersonaError
from persona.core.store import write_csv
from persona.data.examples import check_example_files
from persona.models import (
    DEFAULT_MODEL,
    adapter_base,
    is_adapter,
    model_on_base,
    model_short_name,
    model_source,
)
from persona.vectors import layers_dir, load_metadata, vector_for_model

ActivationKind = Literal["response_avg", "prompt_last", "prompt_avg"]
PRODUCES = ("layer_metrics.csv", "layer_metrics.png")
SHIFT_PRODUCES = ("representation_shift.csv", "representation_shift.png")


def layers(
    vector_path: str,
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    pos_path: str | None = None,
    neg_path: str | None = None,
    trait: str | None = None,
    threshold: float = 50.0,
    no_filter: bool = False,
    pairs_path: str | None = None,
    split: str | None = None,
    output_dir: str | None = None,
    kind: ActivationKind = "response_avg",
    compare_to: str | None = None,
    compare_model: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    hardware: Hardware = Hardware(),
    batching: Batching = Batching(),
) -> int | None:
    """Per-layer AUC, separation and variance of projections on a persona vector; recommends a layer.

    Writes <output_dir>/layer_metrics.csv and layer_metrics.png and prints and returns the recommended
    layer (highest AUC, ties broken by the larger normalised separation; layer 0 excluded). Under DDP
    only global rank 0 returns it (the others return None). With --compare_to (the base model's vector of
    the same trait; --model the fine-tuned model, e.g. a LoRA adapter): also representation_shift.csv/.png,
    per layer the cosine and norm ratio of the two vectors and the metrics in both models on the same examples.

    Args:
        vector_path: Vector file [num_layers+1, hidden] from `persona extract`.
        model: Model alias (smollm2-135m, the embedded default), hub id, local path or PEFT adapter directory.
        base_model: With --model a LoRA adapter: the base model to apply it on instead of the one its adapter_config.json records (e.g. a path from another machine); the adapter's files are left as they are.
        pos_path: CSV of responses showing the trait (prompt, answer, <trait>, coherence).
        neg_path: CSV of responses not showing it, row-aligned with pos_path.
        trait: Score column for filtering the CSVs; default: the trait in the vector's sidecar.
        threshold: Keep pairs with pos score >= threshold, neg score < 100 - threshold (both coherence >= 50).
        no_filter: Use every CSV row.
        pairs_path: Contrastive pairs JSONL instead of CSVs (positive = trait shown).
        split: With pairs_path: only pairs of this split; use held-out pairs (e.g. test) to pick a layer fairly.
        output_dir: Where to write the CSV and PNG; default <vector-stem>_layers/ beside the vector file.
        kind: Activation projected per example: response_avg, prompt_last or prompt_avg.
        compare_to: The same trait's vector of the model before fine-tuning: adds the representation shift.
        compare_model: The model compare_to was extracted from; default the adapter's base (--model an adapter).
        batch_size: Examples per forward pass.
        overwrite: Replace layer_metrics.csv/png if they exist in output_dir.
    """
    model = model_on_base(model, base_model)
    checks.example_inputs(pos_path, neg_path, pairs_path)
    checks.at_least(batch_size, 1, "--batch_size")
    checks.device_map_alone(batching.device_map, hardware.devices, hardware.strategy)
    model_source(model)
    out = Path(output_dir) if output_dir else layers_dir(vector_path)
    inputs = {
        "--vector_path": vector_path,
        "--pos_path": pos_path,
        "--neg_path": neg_path,
        "--pairs_path": pairs_path,
        "--compare_to": compare_to,
    }
    produces = PRODUCES + (SHIFT_PRODUCES if compare_to else ())
    checks.output_dir(out, "--output_dir", produces=produces, overwrite=overwrite, inputs=inputs)
    vector = vector_for_model(model, vector_path, trust_remote_code=hardware.trust_remote_code)
    baseline = None
    if compare_to is not None:
        compare_model = compare_model or (adapter_base(model) if is_adapter(model) else None)
        if compare_model is None:
            raise PersonaError(
                f"--compare_to {compare_to}: which model was it extracted from? Fix: --compare_model BASE "
                "(not needed when --model is a LoRA adapter: its base is used)."
            )
        model_source(compare_model, "--compare_model")
        baseline = (
            compare_model,
            vector_for_model(compare_model, compare_to, trust_remote_code=hardware.trust_remote_code),
        )
    if pairs_path is None and trait is None and not no_filter:
        trait = load_metadata(vector_path).get("trait")
    check_example_files(pos_path, neg_path, pairs_path, trait, no_filter)

    data = dict(pos_path=pos_path, neg_path=neg_path, trait=trait, threshold=threshold, no_filter=no_filter,
                pairs_path=pairs_path, split=split, batch_size=batch_size, max_length=batching.max_length,
                trust_remote_code=hardware.trust_remote_code, max_batch_tokens=batching.max_batch_tokens)  # fmt: skip
    run = dict(kind=kind, dtype=hardware.dtype, accelerator=hardware.accelerator, devices=hardware.devices, strategy=hardware.strategy,
               trust_remote_code=hardware.trust_remote_code, device_map=batching.device_map)  # fmt: skip
    metrics = projection_metrics(model, vector, data, **run)
    if metrics is None:  # not global rank 0
        return None
    recommended = recommend_layer(metrics)
    metrics["recommended"] = metrics["layer"] == recommended

    csv_path, png_path = out / PRODUCES[0], out / PRODUCES[1]
    write_csv(csv_path, metrics)
    plot_layer_metrics(metrics, recommended, png_path, title=f"{Path(vector_path).name}: {kind} projections")
    row = metrics.loc[metrics["layer"] == recommended].iloc[0]
    print(f"metrics: {csv_path}\nfigure: {png_path}")
    print(
        f"recommended layer: {recommended} (AUC {row['auc']:.3f}, normalised separation "
        f"{row['normalized_separation']:.2f})"
    )
    if baseline is not None:
        base_metrics = projection_metrics(baseline[0], baseline[1], data, **run)
        title = f"{Path(vector_path).stem}: {model_short_name(model)} vs {model_short_name(baseline[0])}"
        write_representation_shift(out, baseline[1], vector, base_metrics, metrics, title)
    return recommended


def projection_metrics(
    model: str, vector: np.ndarray, data: dict, *, kind: str, module=None, **run
) -> pd.DataFrame | None:
    """Per-layer metrics of ``vector``'s projections in ``model`` (or the loaded ``module``) over the examples
    ``data`` describes (``ResponseDataModule`` arguments); None on ranks other than global rank 0."""
    import torch

    from persona.data.modules import ResponseDataModule
    from persona.vectors.projection import ExampleProjector, predict_projections

    datamodule = ResponseDataModule(model=model, **data)
    examples = datamodule.load_examples()  # bad rows fail here, before the model loads
    labels = np.array([example.label for example in examples])
    if labels.min() == labels.max():
        raise MissedResult(
            f"{', '.join(datamodule.sources())}: only {'positive' if labels[0] else 'negative'} "
            "examples. Fix: give both kinds."
        )
    lightning = {name: run.pop(name) for name in ("accelerator", "devices", "strategy")}
    projector = ExampleProjector(
        model=model, layers=list(range(len(vector))), directions=torch.from_numpy(vector), kinds=[kind],
        module=module, **run,
    )  # fmt: skip
    scores = predict_projections(projector, datamodule, len(examples), **lightning)
    return None if scores is None else layer_metrics(scores[kind].numpy(), labels)


def write_representation_shift(
    out: Path, base_vector, tuned_vector, base_metrics, tuned_metrics, title: str
) -> None:
    from persona.analysis.representation_shift import (
        plot_representation_shift,
        representation_shift,
        summarise,
    )

    table = representation_shift(base_vector, tuned_vector, base_metrics, tuned_metrics)
    summary = summarise(table)
    write_csv(out / SHIFT_PRODUCES[0], table)
    plot_representation_shift(table, summary, out / SHIFT_PRODUCES[1], title=title)
    print(f"representation shift: {out / SHIFT_PRODUCES[0]}\nfigure: {out / SHIFT_PRODUCES[1]}")
    print(
        f"recommended layer: base {summary['base']['recommended']} -> fine-tuned {summary['tuned']['recommended']}; "
        f"mean cosine of the vectors {summary['mean_cosine']:.3f} (lowest at layer {summary['min_cosine_layer']})"
    )
