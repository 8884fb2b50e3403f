"""Extraction as a Lightning predict loop: running per-layer means of positive and negative examples.

Per example we take the mean over prompt tokens, the mean over response tokens and the last prompt
token at every layer; per label we average those over examples (the seed's mean of per-example
means) with running sums and counts, reduced across DDP ranks before dividing.

The negative (trait-free) examples' per-example means are kept as well (float32, on the CPU: ``[n_negative,
num_layers + 1, hidden]`` per kind), so that once the vectors are known their projections give the sidecar's
per-layer percentiles (:mod:`persona.vectors.ranges`), the data a capping range or a gate threshold is taken
from, without a second pass over the examples. The neutral texts' percentiles (:mod:`persona.vectors.neutral_ranges`) take
one extra small batched pass over those ~30 sentences, on every rank (a sharded model needs them all to forward).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from persona.core.constants import VECTOR_KINDS
from persona.core.hardware import input_device
from persona.hooks import locate_blocks
from persona.hooks.placement import KeepsDevicePlacement
from persona.models import DEFAULT_MODEL, adapter_base, adapter_origin, is_adapter, load_model
from persona.vectors.activations import kind_row_mask, norm_token_mask, read_example_means
from persona.vectors.files import default_save_dir, save_vector, vector_filename
from persona.vectors.neutral_ranges import neutral_record
from persona.vectors.ranges import NEUTRAL_KEY, PERCENTILES_KEY, PROJECTION_PERCENTILES, percentile_record


class VectorExtractor(KeepsDevicePlacement, L.LightningModule):
    """Accumulates per-label sums of per-example means at every layer; saves the three mean differences."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        trait: str = "trait",
        save_dir: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device_map: str | None = None,
        module: torch.nn.Module | None = None,
        record_neutral: bool = True,
    ):
        """
        Args:
            model: Model alias, hub id or local path (its name goes into the sidecars).
            trait: Trait name used in the output file names.
            save_dir: Where to write <trait>_{prompt_avg,response_avg,prompt_last}_diff.pt; default persona_vectors/<model>/.
            dtype: Model dtype (float32, bfloat16, float16, auto).
            trust_remote_code: Allow the model's custom code (off unless you trust the repository).
            device_map: Place the model across this process's GPUs (``auto``) for a model larger than one GPU.
            module: An already-loaded model to use instead of loading ``model`` (not saved as a hyperparameter).
            record_neutral: Record the neutral texts' projection percentiles (one small extra pass); off, they are
                measured on first use of a ``neutral:`` bound instead.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["module"])
        self.model: torch.nn.Module | None = module
        self.vectors: dict[str, torch.Tensor] = {}
        self.saved_paths: dict[str, Path] = {}

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            self.model = load_model(
                hp.model, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code, device_map=hp.device_map
            )
        self.model.requires_grad_(False)

    def on_predict_start(self) -> None:
        layout = locate_blocks(self.model)
        self.layers = list(range(layout.num_layers + 1))
        hidden = self.model.get_input_embeddings().weight.shape[-1]
        # [label (0 neg, 1 pos), kind, layer, hidden]; float64 so long runs don't drift. Where batches go: the
        # module's device, or the input embeddings' under a device_map.
        device = input_device(self.model)
        self.sums = torch.zeros(
            2, len(VECTOR_KINDS), len(self.layers), hidden, dtype=torch.float64, device=device
        )
        self.counts = torch.zeros(2, len(VECTOR_KINDS), dtype=torch.float64, device=device)
        self.negative_means: dict[str, list[torch.Tensor]] = {kind: [] for kind in VECTOR_KINDS}
        # Residual norms per layer over every real token but each row's first, from the same forward: the
        # sidecar's mean_residual_norms, the yardstick of a steering dose (persona.vectors.dose).
        self.norm_sums = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.norm_tokens = torch.zeros((), dtype=torch.float64, device=device)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """This batch's per-label sums of per-example means ``sums: [label, kind, layer, hidden]``, the
        examples they add up, ``counts: [label, kind]`` (float64), the negative examples' means
        ``negatives: {kind: [n, layer, hidden]}`` and the residual norms' sums; ``on_predict_batch_end``
        accumulates them."""
        norm_sums = torch.zeros_like(self.norm_sums)
        means = read_example_means(self.model, batch, self.layers, norm_sums=norm_sums)
        sums, counts = torch.zeros_like(self.sums), torch.zeros_like(self.counts)
        negatives = {}
        for kind_index, kind in enumerate(VECTOR_KINDS):
            has_tokens = kind_row_mask(batch, kind)
            for label in (0, 1):
                rows = (has_tokens & (batch["labels"] == label)).to(torch.float64)
                sums[label, kind_index] = torch.einsum("b,blh->lh", rows, means[kind].double())
                counts[label, kind_index] = rows.sum()
            negatives[kind] = means[kind][has_tokens & (batch["labels"] == 0)]
        norm_tokens = norm_token_mask(batch).sum().to(self.norm_tokens)
        return {"sums": sums, "counts": counts, "negatives": negatives, "norm_sums": norm_sums,
                "norm_tokens": norm_tokens}  # fmt: skip

    def on_predict_batch_end(self, outputs: dict, batch, batch_idx: int, dataloader_idx=0):
        self.sums += outputs["sums"]
        self.counts += outputs["counts"]
        for kind, means in outputs["negatives"].items():
            self.negative_means[kind].append(means.float().cpu())
        self.norm_sums += outputs["norm_sums"]
        self.norm_tokens += outputs["norm_tokens"]

    def on_predict_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self.sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(self.counts, reduce_op="sum")
        norm_sums = self.trainer.strategy.reduce(self.norm_sums, reduce_op="sum")
        norm_tokens = self.trainer.strategy.reduce(self.norm_tokens, reduce_op="sum")
        self.mean_residual_norms = (norm_sums / norm_tokens.clamp_min(1)).cpu().tolist()
        for kind_index, kind in enumerate(VECTOR_KINDS):
            n_neg, n_pos = (int(c) for c in counts[:, kind_index].tolist())
            if n_pos == 0 or n_neg == 0:
                raise ValueError(
                    f"No {'positive' if n_pos == 0 else 'negative'} examples with tokens for {kind} "
                    "(empty responses?). Fix: check the input files."
                )
            mean_pos = sums[1, kind_index] / n_pos
            mean_neg = sums[0, kind_index] / n_neg
            self.vectors[kind] = (mean_pos - mean_neg).float().cpu()
        self.percentiles = {kind: self._negative_percentiles(kind) for kind in VECTOR_KINDS}
        self.neutral_percentiles = (
            neutral_record(self.model, self._tokenizer(), self.vectors)
            if self.hparams.record_neutral
            else None
        )
        self.final_counts = counts.cpu()
        if self.trainer.is_global_zero:
            self._save()

    def _negative_percentiles(self, kind: str) -> dict:
        """Per-layer percentiles of every rank's negative examples projected on the unit vector of ``kind``."""
        vector = self.vectors[kind]
        unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        means = self.negative_means[kind]
        local = torch.cat(means) if means else torch.zeros(0, *vector.shape)
        projections = torch.einsum("nlh,lh->nl", local.double(), unit.double())
        projections = self._gather_rows(projections)
        quantiles = torch.tensor(PROJECTION_PERCENTILES, dtype=torch.float64) / 100
        return percentile_record(torch.quantile(projections, quantiles, dim=0).T.tolist())

    def _tokenizer(self):
        """The datamodule's tokenizer (the one the examples were read with), else the model's."""
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            from persona.models import load_tokenizer

            tokenizer = load_tokenizer(self.hparams.model, trust_remote_code=self.hparams.trust_remote_code)
        return tokenizer

    def _gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """``values [n_local, layers]`` of every rank, concatenated (ranks hold different numbers of rows)."""
        if self.trainer.world_size == 1:
            return values
        strategy, device = self.trainer.strategy, self.sums.device
        counts = strategy.all_gather(torch.tensor([values.shape[0]], device=device)).flatten().tolist()
        padded = torch.zeros(max(counts), values.shape[1], dtype=values.dtype, device=device)
        padded[: values.shape[0]] = values.to(device)
        gathered = strategy.all_gather(padded).cpu()  # [world, max rows, layers]
        return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])

    def _save(self) -> None:
        hp = self.hparams
        save_dir = Path(hp.save_dir) if hp.save_dir else default_save_dir(hp.model)
        datamodule = getattr(self.trainer, "datamodule", None)
        sources = datamodule.sources() if hasattr(datamodule, "sources") else []
        config = self.model.config
        for kind_index, kind in enumerate(VECTOR_KINDS):
            meta = {
                "model": hp.model,
                "model_type": config.model_type,
                "trait": hp.trait,
                "kind": kind,
                "num_layers": len(self.layers) - 1,
                "hidden_size": int(self.vectors[kind].shape[-1]),
                "n_positive": int(self.final_counts[1, kind_index]),
                "n_negative": int(self.final_counts[0, kind_index]),
                "sources": sources,
                PERCENTILES_KEY: self.percentiles[kind],
                "mean_residual_norms": [round(value, 6) for value in self.mean_residual_norms],
                "mean_residual_norms_source": "extraction: every real token but each example's first, "
                f"{int(self.final_counts[:, 0].sum())} examples",
            }
            if self.neutral_percentiles is not None:
                meta[NEUTRAL_KEY] = self.neutral_percentiles[kind]
            if is_adapter(hp.model):  # the fine-tuned model: which base, which adapter
                meta.update(base_model=adapter_base(hp.model), adapter=adapter_origin(hp.model))
            if datamodule is not None and getattr(datamodule.hparams, "pairs_path", None) is None:
                meta["threshold"] = None if datamodule.hparams.no_filter else datamodule.hparams.threshold
            self.saved_paths[kind] = save_vector(
                self.vectors[kind], save_dir / vector_filename(hp.trait, kind), meta
            )
