"""``persona project``: score columns added to a CSV or JSONL file (the seed's cal_projection)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from persona.commands.flags import Batching, Hardware
from persona.core import checks
from persona.data.scored_files import (
    present_fields,
    projection_column,
    read_scored_file,
    scored_file_examples,
    write_scores,
)
from persona.models import DEFAULT_MODEL, model_on_base, model_source
from persona.vectors import vector_for_model

ProjectionType = Literal["proj", "prompt_last_proj", "cos_sim"]
# projection_type -> (activation kind read per example, cosine similarity instead of projection)
PROJECTION_TYPES: dict[str, tuple[str, bool]] = {
    "proj": ("response_avg", False),
    "prompt_last_proj": ("prompt_last", False),
    "cos_sim": ("response_avg", True),
}


def project(
    file_path: str,
    vector_path: str | list[str],
    layer: int | list[int],
    projection_type: ProjectionType = "proj",
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    hardware: Hardware = Hardware(),
    batching: Batching = Batching(),
) -> list[str]:
    """Score every row of a dataset along persona vectors; adds one column per (vector, layer) to the file.

    Columns are named <model-short-name>_<vector-stem>_<projection_type>_layer<L> (as the seed's
    cal_projection). All vectors and layers are read in one forward pass per batch. Empty responses
    score empty (NaN in CSV, null in JSONL) for proj and cos_sim.

    Args:
        file_path: CSV with prompt (chat-formatted) and answer columns, or JSONL with messages (the last, an assistant message, is the response).
        vector_path: Vector file(s) [num_layers+1, hidden] from `persona extract`; a list for several.
        layer: Layer(s) to read (0 = embeddings, L = output of block L-1); a list for several.
        projection_type: proj (response average on the unit vector), prompt_last_proj (last prompt token on the unit vector) or cos_sim (cosine of response average and vector).
        model: Model alias (smollm2-135m, the embedded default), hub id or local path.
        base_model: With --model a LoRA adapter: the base model to apply it on instead of the one its adapter_config.json records (e.g. a path from another machine); the adapter's files are left as they are.
        overwrite: Recompute columns that already exist (otherwise they are skipped).
        batch_size: Examples per forward pass.
    """
    model = model_on_base(model, base_model)
    if projection_type not in PROJECTION_TYPES:
        raise ValueError(
            f"projection_type={projection_type!r}. Fix: use one of {', '.join(PROJECTION_TYPES)}."
        )
    checks.at_least(batch_size, 1, "--batch_size")
    checks.device_map_alone(batching.device_map, hardware.devices, hardware.strategy)
    path = checks.input_file(file_path, "--file_path")
    checks.output_file(path, "--file_path", exists_ok=True)  # rewritten in place: must be writable
    model_source(model)
    data = read_scored_file(path)
    targets = plan_columns(path, data, model, vector_path, layer, projection_type, overwrite)
    if not targets:
        print(f"{path}: nothing to compute.")
        return []
    directions = target_directions(model, targets, trust_remote_code=hardware.trust_remote_code)

    import torch  # noqa: F401  (the heavy part starts here)

    from persona.data.modules import ExampleDataModule
    from persona.models import load_tokenizer
    from persona.vectors.projection import ExampleProjector, predict_projections

    tokenizer = load_tokenizer(model, padding_side="right", trust_remote_code=hardware.trust_remote_code)
    examples = scored_file_examples(path, data, tokenizer)
    kind, cosine = PROJECTION_TYPES[projection_type]
    names = list(targets)
    projector = ExampleProjector(
        model=model,
        layers=[targets[name][1] for name in names],
        directions=torch.from_numpy(directions),
        kinds=[kind],
        cosine=cosine,
        dtype=hardware.dtype,
        trust_remote_code=hardware.trust_remote_code,
        device_map=batching.device_map,
    )
    datamodule = ExampleDataModule(examples, tokenizer, batch_size=batch_size,
                                   max_batch_tokens=batching.max_batch_tokens, max_length=batching.max_length)  # fmt: skip
    scores = predict_projections(projector, datamodule, len(examples), **hardware.trainer)
    if scores is None:  # not global rank 0: rank 0 writes the file
        return names
    columns = {name: scores[kind][:, column].numpy() for column, name in enumerate(names)}
    write_scores(path, data, columns)
    empty = int(sum(values != values for values in columns[names[0]]))  # NaN: no response tokens
    print(f"{path}: wrote {', '.join(names)} ({len(examples)} rows).")
    if empty:
        print(f"note: {empty} row(s) have an empty response and score empty (NaN / null).")
    return names


def plan_columns(
    path, data, model, vector_path, layer, projection_type, overwrite
) -> dict[str, tuple[str, int]]:
    """``column -> (vector path, layer)`` still to compute (existing columns skipped unless ``overwrite``)."""
    vector_paths = list(dict.fromkeys([vector_path] if isinstance(vector_path, str | Path) else vector_path))
    layer_list = list(dict.fromkeys([layer] if isinstance(layer, int) else layer))
    if not vector_paths or not layer_list:
        raise ValueError("Give at least one --vector_path and one --layer.")
    for vector in vector_paths:
        checks.input_file(vector, "--vector_path", what="vector file")
    for value in layer_list:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"--layer {value!r}: layers are integers >= 0 (0 = embeddings, L = output of block L-1)."
            )
    targets: dict[str, tuple[str, int]] = {}
    for vector in vector_paths:
        for value in layer_list:
            name = projection_column(model, vector, projection_type, value)
            if name in targets:
                raise ValueError(
                    f"--vector_path {targets[name][0]} and {vector} give the same column {name!r}. "
                    "Fix: rename one of the vector files."
                )
            targets[name] = (str(vector), value)
    existing = present_fields(data)
    for name in [name for name in targets if name in existing and not overwrite]:
        print(f"{path}: column {name} already exists, skipping (pass --overwrite to recompute).")
        del targets[name]
    return targets


def target_directions(
    model: str, targets: dict[str, tuple[str, int]], *, trust_remote_code: bool
) -> np.ndarray:
    """``[n_targets, hidden]``: each target's row of its vector file, checked against the model's dimensions."""
    layers_of: dict[str, list[int]] = {}
    for vector, value in targets.values():
        layers_of.setdefault(vector, []).append(value)
    vectors = {
        vector: vector_for_model(model, vector, layers=layers, trust_remote_code=trust_remote_code)
        for vector, layers in layers_of.items()
    }
    return np.stack([vectors[vector][value] for vector, value in targets.values()])
