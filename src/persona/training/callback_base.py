"""What the training callbacks share: layer and vector-file checks, and hooks attached only while a batch runs.

:class:`TrainStepHooks` is the base of the callbacks that intervene (steering, CAFT, capping); the monitor uses it to
pause them while it measures. Both callbacks.py and monitor.py import from here, and not from each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from persona.hooks import locate_blocks
from persona.hooks.layers import DecoderLayout, hidden_size


def checked_layers(layers: Sequence[int], owner: str) -> list[int]:
    if isinstance(layers, (int, str)) or not layers:
        raise ValueError(f"{owner}: layers={layers!r}. Fix: pass a non-empty list of layers, e.g. [10].")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(
                f"{owner}: layers contains {layer!r}. Fix: use layer indices >= 0 (0 = embeddings)."
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{owner}: layers={list(layers)} repeats a layer. Fix: list each layer once.")
    return list(layers)


def check_rows(owner: str, path: str, rows: int, layers: Sequence[int]) -> None:
    for layer in layers:
        if layer >= rows:
            raise ValueError(
                f"{owner}: layer {layer} is out of range for {path}, which has {rows} rows (layers 0..{rows - 1}). "
                "Fix: choose layers the vector file covers."
            )


def check_against_model(
    owner: str, path: str, shape: Sequence[int], layout: DecoderLayout, *, rows: bool
) -> None:
    """Hidden size (last dim) and, if ``rows``, the row count (first dim) of a file against the model."""
    model_name, width = type(layout.model).__name__, hidden_size(layout)
    if shape[-1] != width:
        raise ValueError(
            f"{owner}: {path} has hidden size {shape[-1]}, but {model_name} has hidden size {width}. "
            "Fix: use vectors extracted from this model."
        )
    if rows and shape[0] != layout.num_layers + 1:
        raise ValueError(
            f"{owner}: {path} has {shape[0]} rows, but {model_name} has {layout.num_layers} blocks (expected "
            f"{layout.num_layers + 1} rows: embeddings + one per block). Fix: use vectors extracted from this model."
        )


def causal_lm(pl_module: L.LightningModule, owner: str) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module):
        raise AttributeError(
            f"{owner} needs pl_module.model (the causal LM), but {type(pl_module).__name__}.model is {model!r}. "
            "Fix: build the model in __init__, setup or configure_model and store it as self.model."
        )
    return model


def vector_stem(path: str) -> str:
    return Path(path).name.split(".")[0]  # as in projection column names: cut at the first dot


class TrainStepHooks(Callback):
    """Hooks present only while a training batch (and, with ``during_validation``, a validation batch) runs."""

    def __init__(self, layers: Sequence[int], during_validation: bool) -> None:
        self.layers = checked_layers(layers, type(self).__name__)
        self.during_validation = bool(during_validation)
        self._stack: ExitStack | None = None
        self._model: nn.Module | None = None  # the model the tensors were checked against and placed for

    # Subclasses: read files (no model needed), check + place tensors for a model, build the hooks.
    def _load_files(self) -> None:
        raise NotImplementedError

    def _prepare(self, layout: DecoderLayout) -> None:
        raise NotImplementedError

    def _hooks(self, model: nn.Module) -> AbstractContextManager:
        raise NotImplementedError

    @property
    def active(self) -> bool:
        """True while the hooks are attached."""
        return self._stack is not None

    def _bind(self, pl_module: L.LightningModule) -> nn.Module:
        model = causal_lm(pl_module, type(self).__name__)
        self._prepare(locate_blocks(model))
        self._model = model
        return model

    def _attach(self, pl_module: L.LightningModule) -> None:
        self._detach()
        model = getattr(pl_module, "model", None)
        if model is None or model is not self._model:
            model = self._bind(pl_module)
        stack = ExitStack()
        stack.enter_context(self._hooks(model))
        self._stack = stack

    def _detach(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Remove the hooks for the duration of the block (e.g. while a monitor measures), then restore them."""
        if self._stack is None:
            yield
            return
        self._detach()
        try:
            yield
        finally:
            stack = ExitStack()
            stack.enter_context(self._hooks(self._model))
            self._stack = stack

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._load_files()
        if isinstance(getattr(pl_module, "model", None), nn.Module):
            self._bind(pl_module)  # early errors; redone in on_fit_start once the strategy placed the model

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bind(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._attach(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._detach()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.during_validation:
            self._attach(pl_module)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._detach()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._detach()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._detach()

    def on_train_end(self, trainer, pl_module) -> None:
        self._detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._detach()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._detach()


def parameters_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are split across ranks (FSDP2 ``DTensor`` parameters, or FSDP1 wrappers)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 has no public DTensor (and persona's FSDP2 path needs 2.6)
        DTensor = ()

    return any(isinstance(param, DTensor) for param in model.parameters()) or any(
        type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()
    )
