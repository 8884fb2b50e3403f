"""Watch a model drift along persona vectors while it fine-tunes: :class:`ActivationMonitor`.

It measures with :func:`persona.vectors.activations.read_example_means` (a truncated forward, no LM head) in eval
mode under ``torch.no_grad()``, with the training-time hooks of :mod:`persona.training.callbacks` paused,
so what it sees is the model as it would run at inference.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from persona.core.hardware import input_device
from persona.core.store import atomic_write
from persona.data.batches import (
    TokenizedExample,
    bounded_batches,
    collate,
    left_pad,
    length_sorted,
    tokenize_examples,
)
from persona.data.examples import Example
from persona.data.monitor_prompts import read_monitor_prompts
from persona.hooks import locate_blocks
from persona.hooks.layers import check_layer
from persona.training.callback_base import (
    TrainStepHooks,
    causal_lm,
    check_against_model,
    check_rows,
    checked_layers,
    parameters_sharded,
    vector_stem,
)
from persona.vectors import load_vector
from persona.vectors.activations import example_projections


class ActivationMonitor(Callback):
    """Projection of the model's activations on persona vectors during fine-tuning.

    Measured before training (``on_train_start``, the base model), after every ``every_n_epochs``
    epochs and, optionally, every ``every_n_steps`` optimizer steps: at each layer, the mean over the
    prompts of the last-prompt-token projection (``prompt_last``) and of the response-average projection
    (``response_avg``) on each unit-normalised vector. Responses come from the eval file (teacher-forced)
    or are generated greedily at each measurement (``max_new_tokens > 0``); with neither, only
    ``prompt_last`` is measured. Training-time hooks of other callbacks are paused while it measures.

    Outputs: ``monitor/<vector stem>/layer<L>/<kind>`` scalars and histograms (TensorBoard), ``history``
    (rows ``epoch, step, trigger, vector, layer, kind, mean, n``; ``epoch`` = completed epochs) and
    ``monitor.csv`` in ``trainer.log_dir``, rewritten atomically at each measurement.
    """

    CSV_FIELDS = ("epoch", "step", "trigger", "vector", "layer", "kind", "mean", "n")

    def __init__(
        self,
        vector_paths: list[str],
        layers: list[int],
        prompts: list[str] | None = None,
        eval_file: str | None = None,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        max_new_tokens: int = 0,
        batch_size: int = 8,
    ) -> None:
        """
        Args:
            vector_paths: Persona vector files ``[num_layers + 1, hidden]``; logged under each file's stem.
            layers: Layers to measure (0 = embeddings, L = output of block L-1).
            prompts: User prompts (put through the chat template). Exactly one of prompts / eval_file.
            eval_file: Chat JSONL (``messages``, last = response), response CSV (``prompt``, ``answer``) or trait JSON (``questions``).
            every_n_epochs: Measure after every N epochs (0: never at epoch ends).
            every_n_steps: Also measure every N optimizer steps (None or 0: never).
            max_new_tokens: With prompts only: generate this many tokens greedily per measurement and measure the responses too.
            batch_size: Prompts per forward pass.
        """
        self.vector_paths = [str(path) for path in vector_paths] if not isinstance(vector_paths, str) else []
        if not self.vector_paths:
            raise ValueError(
                f"ActivationMonitor: vector_paths={vector_paths!r}. Fix: pass a non-empty list of files."
            )
        self.names = [vector_stem(path) for path in self.vector_paths]
        if len(set(self.names)) != len(self.names):
            raise ValueError(
                f"ActivationMonitor: vector files share a name stem ({self.names}); their logs would "
                "collide. Fix: rename or copy one of them."
            )
        self.layers = checked_layers(layers, "ActivationMonitor")
        if (prompts is None) == (eval_file is None):
            raise ValueError("ActivationMonitor: pass exactly one of prompts or eval_file.")
        for name, value, low in (
            ("every_n_epochs", every_n_epochs, 0),
            ("max_new_tokens", max_new_tokens, 0),
            ("batch_size", batch_size, 1),
            ("every_n_steps", every_n_steps or 1, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ActivationMonitor: {name}={value!r}. Fix: pass an integer >= {low}.")
        self.prompts, self.eval_file = prompts, eval_file
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.history: list[dict] = []
        self.kinds: tuple[str, ...] = ()
        self._generate = False
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._vectors: Tensor | None = None  # [vectors, layers, hidden], the rows to measure, float32 CPU
        self._units: Tensor | None = None  # the same, unit-normalised, on the model's device
        self._tokenized: list[TokenizedExample] | None = None
        self._batches: list[dict[str, Tensor]] | None = None  # this rank's teacher-forced batches, on device
        self._last: tuple[int, dict[str, Tensor]] | None = (
            None  # (global step, values) of the last measurement
        )
        self.start_values: dict[str, Tensor] | None = None  # the train_start measurement, see reuse_start
        self._reused_start: dict[str, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(vector_paths=self.vector_paths, layers=self.layers)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    # -- setup: files, then the model and the tokenizer (now if the module has them, else at fit start) --
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        rows = []
        for path in self.vector_paths:
            vector = load_vector(path)
            check_rows("ActivationMonitor", path, vector.shape[0], self.layers)
            rows.append(vector)
        widths = {path: row.shape[-1] for path, row in zip(self.vector_paths, rows, strict=True)}
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"ActivationMonitor: the vector files disagree on hidden size: {widths}. "
                "Fix: use vectors extracted from the same model."
            )
        self._vectors = torch.stack([row[self.layers] for row in rows])
        self._shapes = {path: tuple(row.shape) for path, row in zip(self.vector_paths, rows, strict=True)}
        self._tokenized = self._batches = self._last = None
        self.history = []  # this fit's rows; a checkpoint's are restored after setup (load_state_dict)
        if isinstance(getattr(pl_module, "model", None), nn.Module):
            self._bind(pl_module)
        if getattr(pl_module, "tokenizer", None) is not None:
            self._tokenize(pl_module.tokenizer)

    def _bind(self, pl_module: L.LightningModule) -> None:
        layout = locate_blocks(causal_lm(pl_module, "ActivationMonitor"))
        for path, shape in self._shapes.items():
            check_against_model("ActivationMonitor", path, shape, layout, rows=True)
        for index, layer in enumerate(self.layers):
            check_layer(layout, layer, what=f"ActivationMonitor.layers[{index}]")
        device = input_device(layout.model)
        self._units = (self._vectors / self._vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(device)

    def _tokenize(self, tokenizer) -> None:
        prompts, responses = read_monitor_prompts(tokenizer, prompts=self.prompts, eval_file=self.eval_file)
        self._generate = responses is None and self.max_new_tokens > 0
        self.kinds = (
            ("prompt_last", "response_avg") if responses is not None or self._generate else ("prompt_last",)
        )
        examples = [
            Example(prompt, "" if responses is None else responses[i], 0, f"monitor:{i}")
            for i, prompt in enumerate(prompts)
        ]
        self._tokenized = tokenize_examples(examples, tokenizer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bind(pl_module)  # again: the strategy may have moved the model since setup
        if self._tokenized is None:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise AttributeError(
                    f"ActivationMonitor needs pl_module.tokenizer, but {type(pl_module).__name__} "
                    "has none. Fix: store the tokenizer as self.tokenizer."
                )
            self._tokenize(tokenizer)
        self._batches = None

    def reuse_start(self, values: dict[str, Tensor]) -> None:
        """Take ``values`` (another monitor's :attr:`start_values`) as this fit's measurement before training,
        instead of a forward pass. Only for a model known to equal the one measured there at that point: the same
        base, vectors, layers and prompts, a freshly initialised adapter (LoRA's B = 0), no checkpoint resumed — as
        the study's runs on one base are. A resumed fit (global step > 0) measures anyway."""
        self._reused_start = values

    # -- when to measure --
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reused_start is not None and trainer.global_step == 0:
            self._last = (0, self._reused_start)  # _measure reads a measurement of this step from _last
        self._measure(trainer, pl_module, "train_start", trainer.current_epoch)
        self.start_values = self._last[1] if self._last is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step % self.every_n_steps == 0
            and (self._last is None or self._last[0] != step)
        ):
            self._measure(trainer, pl_module, "step", trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure(trainer, pl_module, "epoch_end", trainer.current_epoch + 1)

    # -- measuring --
    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, trigger: str, epoch: int) -> None:
        step = trainer.global_step
        if self._last is not None and self._last[0] == step:
            values = self._last[1]  # no optimizer step since: the model is unchanged
        else:
            values = self._gather(trainer, self._compute(trainer, pl_module))
            self._last = (step, values)
        means = torch.stack([values[kind].nanmean(dim=0) for kind in self.kinds])  # [kinds, vectors, layers]
        counts = torch.stack([(~values[kind].isnan()).sum(dim=0) for kind in self.kinds])
        tags = {
            (k, v, li): f"monitor/{name}/layer{layer}/{kind}"
            for k, kind in enumerate(self.kinds)
            for v, name in enumerate(self.names)
            for li, layer in enumerate(self.layers)
        }
        mean_list, count_list = means.tolist(), counts.tolist()  # one host sync per measurement
        if trigger == "epoch_end":
            for (k, v, li), tag in tags.items():
                pl_module.log(
                    tag, means[k, v, li], sync_dist=True, batch_size=1
                )  # equal on every rank already
        else:
            # pl_module.log from on_train_start would be written together with (and overwritten by) the first
            # epoch-end value, and on_step values only every log_every_n_steps: write these directly.
            scalars = {tag: mean_list[k][v][li] for (k, v, li), tag in tags.items()}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
        boards = (
            [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
            if trainer.is_global_zero
            else []
        )
        if boards:
            on_host = {kind: values[kind].cpu() for kind in self.kinds}  # one transfer per kind, not per tag
            for (k, v, li), tag in tags.items():
                column = on_host[self.kinds[k]][:, v, li]
                column = column[~column.isnan()]
                for board in boards if column.numel() else ():
                    board.experiment.add_histogram(tag, column, global_step=step)
        for k, v, li in tags:
            self.history.append(
                {
                    "epoch": epoch,
                    "step": step,
                    "trigger": trigger,
                    "vector": self.names[v],
                    "layer": self.layers[li],
                    "kind": self.kinds[k],
                    "mean": mean_list[k][v][li],
                    "n": count_list[k][v][li],
                }
            )
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if trainer.is_global_zero and log_dir is not None:
            self._write_csv(Path(log_dir) / "monitor.csv")

    def _write_csv(self, path: Path) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.CSV_FIELDS)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))

    def _compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """This rank's share of the prompts: ``{kind: [n_local, vectors, layers]}``, NaN where a row has no tokens."""
        model = pl_module.model
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), ExitStack() as paused:
                for callback in trainer.callbacks:
                    if isinstance(callback, TrainStepHooks):
                        paused.enter_context(callback.paused())
                out: dict[str, list[Tensor]] = {kind: [] for kind in self.kinds}
                vectors, layers, hidden = self._units.shape
                target_layers = self.layers * vectors  # target (v, l) at v * layers + l
                for batch, keep in self._rank_batches(trainer, pl_module):
                    scores = example_projections(
                        model, batch, target_layers, self._units.reshape(-1, hidden), self.kinds
                    )
                    for kind in self.kinds if keep else ():
                        out[kind].append(scores[kind].view(-1, vectors, layers))
        finally:
            for module, mode in modes.items():
                module.train(mode)
        shape = (0, len(self.names), len(self.layers))
        return {
            kind: torch.cat(parts) if parts else self._units.new_empty(shape) for kind, parts in out.items()
        }

    def _rank_batches(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> Iterator[tuple[dict[str, Tensor], bool]]:
        """This rank's batches, each with whether to keep its scores.

        Under FSDP every forward gathers weights from all ranks, so every rank must run as many forwards: a rank
        with fewer prompts runs filler batches (scores dropped) and generation runs with ``synced_gpus``.
        """
        tokenizer = pl_module.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = self._units.device
        chunks = self._rank_chunks(trainer.global_rank, trainer.world_size)
        keep = [True] * len(chunks)
        synced = trainer.world_size > 1 and parameters_sharded(pl_module.model)
        if synced:
            most = max(len(self._rank_chunks(rank, trainer.world_size)) for rank in range(trainer.world_size))
            filler = [self._tokenized[0]]
            chunks += [filler] * (most - len(chunks))
            keep += [False] * (most - len(keep))
        if not self._generate:
            if self._batches is None:  # tokenised once in setup, collated and moved once
                self._batches = [
                    {k: t.to(device) for k, t in collate(chunk, pad_id).items()} for chunk in chunks
                ]
            yield from zip(self._batches, keep, strict=True)
            return
        stop = {tokenizer.eos_token_id, pad_id} - {None}
        for chunk, kept in zip(chunks, keep, strict=True):
            input_ids, attention_mask = left_pad([item.input_ids for item in chunk], pad_id)
            generated = pl_module.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                synced_gpus=synced,
            )
            items = []
            for item, new in zip(chunk, generated[:, input_ids.shape[1] :].tolist(), strict=True):
                cut = next((i for i, token in enumerate(new) if token in stop), len(new))
                items.append(TokenizedExample(item.input_ids + new[:cut], item.prompt_len, 0, item.index))
            yield {k: t.to(device) for k, t in collate(items, pad_id).items()}, kept

    def _rank_chunks(self, rank: int, world_size: int) -> list[list[TokenizedExample]]:
        """Rank ``rank``'s share, longest first, in batches of at most ``batch_size`` rows with bounded padding."""
        shard = length_sorted(self._tokenized[rank::world_size])
        lengths = [len(item.input_ids) for item in shard]
        return [
            [shard[i] for i in batch]
            for batch in bounded_batches(range(len(shard)), lengths, max_rows=self.batch_size)
        ]

    def _gather(self, trainer: L.Trainer, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every rank's rows (NaN-padded to equal length, so ``all_gather`` works; NaNs are not counted)."""
        if trainer.world_size == 1:
            return local
        per_rank = math.ceil(len(self._tokenized) / trainer.world_size)
        gathered = {}
        for kind, values in local.items():
            padded = values.new_full((per_rank, *values.shape[1:]), float("nan"))
            padded[: len(values)] = values
            gathered[kind] = trainer.strategy.all_gather(padded).reshape(-1, *values.shape[1:])
        return gathered
