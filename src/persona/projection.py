"""Project examples' activations on persona vectors: the shared predict loop and ``persona project``.

One mechanism serves every "score each example along a vector" step (``project`` here, per-layer
metrics in :mod:`persona.analysis.layers`): :class:`ExampleProjector` reads per-example means with
:func:`persona.activations.read_example_means` (blocks up to the deepest layer only, never the LM
head) and projects them on one direction per target ``(layer, direction)``; a
:class:`ProjectionShardWriter` saves ``(example index, scores)`` per rank so
:func:`predict_projections` can put the scores back in input order.

``persona project`` follows the seed's ``cal_projection``: score columns named
``<model-short-name>_<vector-file-stem>_<projection_type>_layer<L>``, added to the input file in
place. One difference: layer ``num_layers`` is read before the final norm (the seed's
``hidden_states[-1]`` is after it), the convention of our vector files.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from persona.activations import kind_row_mask, read_example_means
from persona.data.batches import collate, length_sorted, tokenize_examples
from persona.data.examples import Example, format_prompt, read_csv_checked, read_jsonl
from persona.extraction import make_trainer
from persona.hooks import locate_blocks
from persona.hooks.layers import check_layer
from persona.models import DEFAULT_MODEL, load_model, load_tokenizer, model_short_name, resolve_model_path
from persona.store import write_csv, write_text
from persona.vectors import VECTOR_KINDS, load_vector, unit

ProjectionType = Literal["proj", "prompt_last_proj", "cos_sim"]
# projection_type -> (activation kind read per example, cosine similarity instead of projection)
PROJECTION_TYPES: dict[str, tuple[str, bool]] = {
    "proj": ("response_avg", False),
    "prompt_last_proj": ("prompt_last", False),
    "cos_sim": ("response_avg", True),
}


# ---------------------------------------------------------------------------------------------------
# The shared mechanism: per-example scores along one direction per (layer, direction) target.


def example_projections(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    layers: Sequence[int],
    directions: torch.Tensor,
    kind: str = "response_avg",
    *,
    cosine: bool = False,
) -> torch.Tensor:
    """Scores ``[batch, n_targets]``: example means of ``kind`` at ``layers[i]`` on ``directions[i]``.

    ``directions``: ``[n_targets, hidden]``. Projection is on the unit direction (the seed's
    ``a_proj_b``); ``cosine`` gives cosine similarity. Rows without tokens of ``kind`` (an empty
    response) score NaN, as the seed's mean over no tokens does. One forward, blocks up to
    ``max(layers)``; a layer shared by several targets is read once.
    """
    distinct = sorted(set(layers))
    means = read_example_means(model, batch, distinct, kinds=(kind,))[kind]  # [batch, len(distinct), hidden]
    activations = means[:, [distinct.index(layer) for layer in layers]]  # [batch, n_targets, hidden]
    directions = directions.to(activations)
    if cosine:
        scores = torch.nn.functional.cosine_similarity(activations, directions.unsqueeze(0), dim=-1)
    else:
        scores = torch.einsum("bnh,nh->bn", activations, unit(directions))
    return scores.masked_fill(~kind_row_mask(batch, kind)[:, None], float("nan"))


class ExampleProjector(L.LightningModule):
    """Predict loop returning ``{"index": [batch], "scores": [batch, n_targets]}`` per batch."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        layers: Sequence[int] = (),
        directions: torch.Tensor | None = None,
        kind: str = "response_avg",
        cosine: bool = False,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        """
        Args:
            model: Model alias, hub id or local path.
            layers: Layer of each target (0 = embeddings, L = output of block L-1).
            directions: [len(layers), hidden] direction of each target.
            kind: Activation read per example: response_avg, prompt_avg or prompt_last.
            cosine: Cosine similarity instead of the projection on the unit direction.
            dtype: Model dtype (float32, bfloat16, float16, auto).
            trust_remote_code: Allow the model's custom code.
        """
        super().__init__()
        if kind not in VECTOR_KINDS:
            raise ValueError(
                f"kind={kind!r} is not an activation kind. Fix: use one of {', '.join(VECTOR_KINDS)}."
            )
        if directions is None or directions.dim() != 2 or directions.shape[0] != len(layers) or not layers:
            raise ValueError("directions must be [len(layers), hidden] with at least one target.")
        self.save_hyperparameters(ignore=["directions"])
        self.hparams.layers = [int(layer) for layer in layers]
        self.register_buffer("directions", directions.detach().float(), persistent=False)
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            self.model = load_model(hp.model, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
            self.model.requires_grad_(False)

    def on_predict_start(self) -> None:
        # Callers validate against the model config; this checks the loaded model itself, still before any forward.
        layout = locate_blocks(self.model)
        for layer in self.hparams.layers:
            check_layer(layout, layer)
        hidden = self.model.get_input_embeddings().weight.shape[-1]
        if self.directions.shape[-1] != hidden:
            raise ValueError(
                f"Directions have hidden size {self.directions.shape[-1]} but {self.hparams.model} has {hidden}. "
                "Fix: use vectors extracted from this model."
            )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        hp = self.hparams
        scores = example_projections(self.model, batch, hp.layers, self.directions, hp.kind, cosine=hp.cosine)
        return {"index": batch["index"], "scores": scores}


class ProjectionShardWriter(BasePredictionWriter):
    """Keeps ``(example index, scores)`` per batch; saves one shard per rank at the end of the epoch."""

    def __init__(self, shard_dir: str | Path):
        super().__init__(write_interval="batch")
        self.shard_dir = str(shard_dir)
        self.indices: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Under DDP every rank runs the caller and makes its own temporary folder: all use rank 0's.
        self.shard_dir = trainer.strategy.broadcast(self.shard_dir)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.indices, self.scores = [], []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        self.indices.append(prediction["index"].cpu())
        self.scores.append(prediction["scores"].float().cpu())

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n_targets = len(pl_module.hparams.layers)
        shard = {
            "index": torch.cat(self.indices) if self.indices else torch.zeros(0, dtype=torch.long),
            "scores": torch.cat(self.scores) if self.scores else torch.zeros(0, n_targets),
        }
        torch.save(shard, Path(self.shard_dir) / f"rank-{trainer.global_rank}.pt")
        trainer.strategy.barrier()  # rank 0 reads every shard once predict returns


def gather_shards(shard_dir: str | Path, n_examples: int, n_targets: int) -> torch.Tensor:
    """Scores ``[n_examples, n_targets]`` in input order from the shards of every rank."""
    scores = torch.full((n_examples, n_targets), float("nan"))
    seen = torch.zeros(n_examples, dtype=torch.bool)
    for path in sorted(Path(shard_dir).glob("rank-*.pt")):
        shard = torch.load(path, weights_only=True)
        scores[shard["index"]] = shard["scores"]
        seen[shard["index"]] = True
    if not bool(seen.all()):
        missing = (~seen).nonzero().flatten()[:5].tolist()
        raise RuntimeError(
            f"No scores for {int((~seen).sum())} example(s) (first indices {missing}) in {shard_dir}."
        )
    return scores


class ExampleDataModule(L.LightningDataModule):
    """Already-read examples, tokenised once, batched longest-first with right padding.

    Batches carry ``index`` = position in ``examples``, like :class:`persona.data.modules.ResponseDataModule`.
    """

    def __init__(
        self, examples: list[Example], tokenizer, batch_size: int = 8, max_length: int | None = None
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.examples = examples
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    def setup(self, stage: str) -> None:
        self.items = length_sorted(
            tokenize_examples(self.examples, self.tokenizer, max_length=self.max_length)
        )

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.items,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
        )


def predict_projections(
    projector: ExampleProjector,
    datamodule: L.LightningDataModule,
    n_examples: int,
    *,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
) -> torch.Tensor | None:
    """Run the predict loop: scores ``[n_examples, n_targets]`` in input order (None on ranks other than 0)."""
    with tempfile.TemporaryDirectory(prefix="persona-projections-") as shard_dir:
        writer = ProjectionShardWriter(shard_dir)
        trainer = make_trainer(accelerator, devices, strategy, callbacks=[writer])
        trainer.predict(projector, datamodule=datamodule, return_predictions=False)
        if not trainer.is_global_zero:
            return None
        return gather_shards(writer.shard_dir, n_examples, len(projector.hparams.layers))


def model_dimensions(model: str, *, trust_remote_code: bool = False) -> tuple[int, int]:
    """``(hidden_size, num_layers)`` from the model's config, without loading its weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    return int(text.hidden_size), int(text.num_hidden_layers)


# ---------------------------------------------------------------------------------------------------
# `persona project`: score columns added to a CSV or JSONL file.


def projection_column(model: str, vector_path: str | Path, projection_type: str, layer: int) -> str:
    """The seed's column name: ``<model-short-name>_<vector-file-stem>_<type>_layer<L>``."""
    stem = Path(vector_path).name.split(".")[0]  # the seed cuts at the first dot
    return f"{model_short_name(model)}_{stem}_{projection_type}_layer{layer}"


def read_scored_file(path: Path) -> pd.DataFrame | list[dict]:
    """A CSV (columns prompt, answer) as a DataFrame, or a JSONL of {messages: [...]} records."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        read_csv_checked(path, ("prompt", "answer"))  # existence, header and columns, with its messages
        # Read as text so the rewrite leaves other columns as they were ("007" stays "007", "" stays "").
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = frame.index[frame["prompt"] == ""].tolist()
        if missing:
            raise ValueError(
                f"{path}: column 'prompt' is empty in row(s) {missing[:5]}. Fix: fill every prompt."
            )
        return frame
    if suffix in (".jsonl", ".json"):
        records = read_jsonl(path)
        for line, record in enumerate(records, start=1):
            where = f"{path}: record {line}"
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or len(messages) < 2:
                raise ValueError(
                    f"{where}: field 'messages' must be a list of at least 2 chat messages "
                    "(the last one is the response). Fix: use the chat JSONL format."
                )
            last = messages[-1]
            if (
                not isinstance(last, dict)
                or last.get("role") != "assistant"
                or not isinstance(last.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: the last message must be {{'role': 'assistant', 'content': str}} "
                    f"(the response to score); found {str(last)[:80]!r}."
                )
        return records
    raise ValueError(
        f"{path}: unknown file type {suffix!r}. Fix: give a .csv (prompt, answer) or .jsonl (messages)."
    )


def present_fields(data: pd.DataFrame | list[dict]) -> set[str]:
    if isinstance(data, pd.DataFrame):
        return set(map(str, data.columns))
    return set.intersection(*(set(record) for record in data))


def scored_file_examples(path: Path, data: pd.DataFrame | list[dict], tokenizer) -> list[Example]:
    if isinstance(data, pd.DataFrame):
        return [
            Example(prompt, answer, 0, f"{path.name}:{row}")
            for row, (prompt, answer) in enumerate(zip(data["prompt"], data["answer"], strict=True))
        ]
    return [
        Example(
            format_prompt(tokenizer, {"messages": record["messages"][:-1]}, where=f"{path}: record {line}"),
            record["messages"][-1]["content"],
            0,
            f"{path.name}:{line}",
        )
        for line, record in enumerate(data, start=1)
    ]


def write_scores(path: Path, data: pd.DataFrame | list[dict], columns: dict[str, np.ndarray]) -> None:
    """Add (or replace) score columns and rewrite ``path`` atomically, rows in their original order."""
    if isinstance(data, pd.DataFrame):
        for name, values in columns.items():
            data[name] = values
        write_csv(path, data)
        return
    for row, record in enumerate(data):
        for name, values in columns.items():
            value = float(values[row])
            record[name] = None if math.isnan(value) else value  # JSON has no NaN
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in data)
    write_text(path, text)


def project(
    file_path: str,
    vector_path: str | list[str],
    layer: int | list[int],
    projection_type: ProjectionType = "proj",
    model: str = DEFAULT_MODEL,
    overwrite: bool = False,
    batch_size: int = 8,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int = 1,
    strategy: str = "auto",
    trust_remote_code: bool = False,
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
        overwrite: Recompute columns that already exist (otherwise they are skipped).
        batch_size: Examples per forward pass.
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: Devices (processes) to use.
        strategy: Lightning strategy (auto, ddp, ddp_spawn).
        trust_remote_code: Allow custom model code from the hub.
    """
    if projection_type not in PROJECTION_TYPES:
        raise ValueError(
            f"projection_type={projection_type!r}. Fix: use one of {', '.join(PROJECTION_TYPES)}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    path = Path(file_path)
    vector_paths = list(dict.fromkeys([vector_path] if isinstance(vector_path, str | Path) else vector_path))
    layer_list = list(dict.fromkeys([layer] if isinstance(layer, int) else layer))
    if not vector_paths or not layer_list:
        raise ValueError("Give at least one --vector_path and one --layer.")
    for value in layer_list:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"--layer {value!r}: layers are integers >= 0 (0 = embeddings, L = output of block L-1)."
            )
    data = read_scored_file(path)

    targets: dict[str, tuple[str, int]] = {}  # column -> (vector path, layer)
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
    if not targets:
        print(f"{path}: nothing to compute.")
        return []

    hidden_size, num_layers = model_dimensions(model, trust_remote_code=trust_remote_code)
    vectors = {
        vector: load_vector(vector, hidden_size=hidden_size, num_layers=num_layers)
        for vector in dict.fromkeys(vector for vector, _ in targets.values())
    }
    for vector, value in targets.values():
        if value > num_layers:
            raise ValueError(
                f"--layer {value} is out of range for {model} with {num_layers} blocks. "
                f"Fix: choose 0..{num_layers} (0 = embeddings, L = output of block L-1)."
            )
        if float(vectors[vector][value].norm()) == 0.0:
            raise ValueError(
                f"{vector}: row {value} is all zeros (no direction to project on). "
                "Fix: choose another --layer."
            )

    tokenizer = load_tokenizer(model, padding_side="right", trust_remote_code=trust_remote_code)
    examples = scored_file_examples(path, data, tokenizer)
    kind, cosine = PROJECTION_TYPES[projection_type]
    names = list(targets)
    projector = ExampleProjector(
        model=model,
        layers=[targets[name][1] for name in names],
        directions=torch.stack([vectors[targets[name][0]][targets[name][1]] for name in names]),
        kind=kind,
        cosine=cosine,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    datamodule = ExampleDataModule(examples, tokenizer, batch_size=batch_size)
    scores = predict_projections(
        projector, datamodule, len(examples), accelerator=accelerator, devices=devices, strategy=strategy
    )
    if scores is None:  # not global rank 0: rank 0 writes the file
        return names
    write_scores(path, data, {name: scores[:, column].numpy() for column, name in enumerate(names)})
    print(f"{path}: wrote {', '.join(names)} ({len(examples)} rows).")
    return names
