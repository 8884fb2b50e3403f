"""Project examples' activations on persona vectors: the shared predict loop.

One mechanism serves every "score each example along a vector" step (``persona project``, per-layer
metrics, screening, finetuning shift): :class:`ExampleProjector` runs
:func:`persona.vectors.activations.example_projections` (blocks up to the deepest layer only, never the LM
head) with one direction per target ``(layer, direction)``; a
:class:`ProjectionShardWriter` saves ``(example index, scores)`` per rank so
:func:`predict_projections` can put the scores back in input order.

``persona project`` (:mod:`persona.commands.project`) follows the seed's ``cal_projection``: score columns named
``<model-short-name>_<vector-file-stem>_<projection_type>_layer<L>``, added to the input file in
place. One difference: layer ``num_layers`` is read before the final norm (the seed's
``hidden_states[-1]`` is after it), the convention of our vector files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from persona.core.constants import VECTOR_KINDS
from persona.core.hardware import make_trainer
from persona.data.modules import ExampleDataModule
from persona.hooks import locate_blocks
from persona.hooks.layers import check_layer
from persona.hooks.placement import KeepsDevicePlacement
from persona.models import DEFAULT_MODEL, load_model
from persona.vectors.activations import example_projections

# ---------------------------------------------------------------------------------------------------
# The predict loop: per-example scores along one direction per (layer, direction) target.


class ExampleProjector(KeepsDevicePlacement, L.LightningModule):
    """Predict loop returning ``{"index": [batch], "scores": [batch, n_kinds, n_targets]}`` per batch."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        layers: Sequence[int] = (),
        directions: torch.Tensor | None = None,
        kinds: Sequence[str] = ("response_avg",),
        cosine: bool = False,
        dtype: str = "float32",
        adapter: str | None = None,
        trust_remote_code: bool = False,
        module: torch.nn.Module | None = None,
        device_map: str | None = None,
    ):
        """
        Args:
            model: Model alias, hub id or local path.
            layers: Layer of each target (0 = embeddings, L = output of block L-1).
            directions: [len(layers), hidden] direction of each target.
            kinds: Activations read per example: response_avg, prompt_avg and/or prompt_last.
            cosine: Cosine similarity instead of the projection on the unit direction.
            dtype: Model dtype (float32, bfloat16, float16, auto).
            adapter: A PEFT adapter directory to load on the model.
            trust_remote_code: Allow the model's custom code.
            module: An already-loaded model to use instead of loading ``model`` (not saved as a hyperparameter).
            device_map: Place the model across this process's GPUs (``auto``) for a model larger than one GPU.
        """
        super().__init__()
        unknown = [kind for kind in kinds if kind not in VECTOR_KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds={list(kinds)!r}. Fix: use one or more of {', '.join(VECTOR_KINDS)}.")
        if directions is None or directions.dim() != 2 or directions.shape[0] != len(layers) or not layers:
            raise ValueError("directions must be [len(layers), hidden] with at least one target.")
        self.save_hyperparameters(ignore=["directions", "module"])
        self.hparams.layers = [int(layer) for layer in layers]
        self.hparams.kinds = list(kinds)
        self.register_buffer("directions", directions.detach().float(), persistent=False)
        self.model = module

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            self.model = load_model(
                hp.model,
                dtype=hp.dtype,
                adapter=hp.adapter,
                trust_remote_code=hp.trust_remote_code,
                device_map=hp.device_map,
            )
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
        scores = example_projections(
            self.model, batch, hp.layers, self.directions, hp.kinds, cosine=hp.cosine
        )
        return {"index": batch["index"], "scores": torch.stack([scores[kind] for kind in hp.kinds], dim=1)}


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
        hp = pl_module.hparams
        shard = {
            "index": torch.cat(self.indices) if self.indices else torch.zeros(0, dtype=torch.long),
            "scores": torch.cat(self.scores)
            if self.scores
            else torch.zeros(0, len(hp.kinds), len(hp.layers)),
        }
        torch.save(shard, Path(self.shard_dir) / f"rank-{trainer.global_rank}.pt")
        trainer.strategy.barrier()  # rank 0 reads every shard once predict returns


def gather_shards(shard_dir: str | Path, n_examples: int, shape: Sequence[int]) -> torch.Tensor:
    """Scores ``[n_examples, *shape]`` in input order from the shards of every rank."""
    scores = torch.full((n_examples, *shape), float("nan"))
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


def predict_projections(
    projector: ExampleProjector,
    datamodule: L.LightningDataModule,
    n_examples: int,
    *,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
) -> dict[str, torch.Tensor] | None:
    """Run the predict loop: ``{kind: [n_examples, n_targets]}`` in input order (None on ranks other than 0)."""
    hp = projector.hparams
    with tempfile.TemporaryDirectory(prefix="persona-projections-") as shard_dir:
        writer = ProjectionShardWriter(shard_dir)
        trainer = make_trainer(accelerator, devices, strategy, callbacks=[writer])
        trainer.predict(projector, datamodule=datamodule, return_predictions=False)
        if not trainer.is_global_zero:
            return None
        scores = gather_shards(writer.shard_dir, n_examples, (len(hp.kinds), len(hp.layers)))
    return {kind: scores[:, i] for i, kind in enumerate(hp.kinds)}


def score_examples(
    module: torch.nn.Module,
    tokenizer,
    examples: list,
    layer: int,
    direction: torch.Tensor,
    kinds: Sequence[str],
    *,
    batch_size: int = 8,
    accelerator: str = "auto",
    devices: int | str = 1,
) -> dict[str, np.ndarray]:
    """``{kind: float64 [len(examples)]}``: projections of a loaded model's example means on ``direction``.

    The same predict loop as ``persona project``, for callers that already hold the model (screening,
    finetuning shift). NaN where an example has no tokens of a kind.
    """
    projector = ExampleProjector(
        model=getattr(module, "name_or_path", "model"),
        layers=[layer],
        directions=direction.detach().float()[None],
        kinds=kinds,
        module=module,
    )
    datamodule = ExampleDataModule(examples, tokenizer, batch_size=batch_size)
    scores = predict_projections(
        projector, datamodule, len(examples), accelerator=accelerator, devices=devices
    )
    return {kind: scores[kind][:, 0].double().numpy() for kind in kinds}
