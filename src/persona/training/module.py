"""LoRA (and QLoRA) fine-tuning of any HF causal LM as a LightningModule.

Checkpoints hold only what training changes: the adapter weights plus optimizer/scheduler/loop state.
The frozen base model is reloaded from ``model`` by ``configure_model`` and the adapter weights are
loaded on top of it, so ``trainer.fit(ckpt_path="last")`` resumes a 7B run from a ~100 MB file.
The final adapter is written in PEFT format (``PeftModel.from_pretrained(base, adapter_dir)``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from persona.core.errors import PersonaError
from persona.core.hardware import resolve_dtype
from persona.models import DEFAULT_MODEL, is_adapter, load_tokenizer, resolve_model_path
from persona.training.losses import causal_lm_loss

log = logging.getLogger(__name__)

# The seed's LoRA targets (attention and MLP projections of Llama/Qwen/Mistral/Gemma-style blocks).
SEED_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the modules LoRA can wrap: ``nn.Linear`` (incl. bitsandbytes 4-bit) and GPT-2's ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear | Conv1D)]


def check_target_modules(model: nn.Module, target_modules: list[str] | str) -> None:
    """Refuse targets this architecture doesn't have, listing the ones it does (PEFT's own matching rules)."""
    if target_modules == "all-linear":
        return
    names = linear_module_names(model)
    if isinstance(target_modules, str):  # PEFT treats a string as a regex over full module names
        unknown = [] if any(re.fullmatch(target_modules, name) for name in names) else [target_modules]
    else:
        unknown = [
            t for t in target_modules if not any(name == t or name.endswith(f".{t}") for name in names)
        ]
    if unknown:
        available = sorted({name.rpartition(".")[2] for name in names})
        raise ValueError(
            f"target_modules {unknown} not found in {type(model).__name__} ({getattr(model.config, 'model_type', '?')}). "
            f"Its linear modules are: {', '.join(available)}. "
            'Fix: set target_modules to some of these, or to "all-linear".'
        )


def _target_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype a ``Module.to(...)`` call casts to, from any of its public forms (dtype, tensor, kwargs)."""
    if isinstance(kwargs.get("dtype"), torch.dtype):
        return kwargs["dtype"]
    for arg in (*args, kwargs.get("tensor")):
        if isinstance(arg, torch.dtype):
            return arg
        if isinstance(arg, torch.Tensor):
            return arg.dtype
    return None


class LoRAFineTune(L.LightningModule):
    """Causal-LM loss on assistant tokens, LoRA adapters on a frozen (optionally 4-bit) base model.

    ``self.model`` is the PEFT-wrapped HF model and ``self.tokenizer`` its tokenizer (callbacks use both).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        dtype: str = "float32",
        r: int = 32,
        lora_alpha: int = 64,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        target_modules: list[str] | str = SEED_TARGET_MODULES,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 5,
        load_in_4bit: bool = False,
        adapter_dir: str | None = None,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            model: Base model: alias (smollm2-135m, the embedded default), hub id or local path.
            dtype: Dtype of the frozen base weights (float32, bfloat16, float16, auto); adapters train in float32.
            r: LoRA rank.
            lora_alpha: LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora).
            lora_dropout: Dropout on the LoRA input.
            use_rslora: Rank-stabilised LoRA scaling alpha / sqrt(r).
            target_modules: Module names (suffixes) to adapt, a regex, or "all-linear"; default the seed's projections.
            learning_rate: Peak AdamW learning rate (linear warm-up, then linear decay to 0).
            weight_decay: AdamW weight decay.
            warmup_steps: Optimizer steps of linear warm-up.
            load_in_4bit: QLoRA: 4-bit NF4 base via bitsandbytes (CUDA only; pip install -e '.[qlora]').
            adapter_dir: Where the final adapter is saved in PEFT format; default <log_dir>/adapter.
            trust_remote_code: Allow the model's custom code (off unless you trust the repository).
        """
        super().__init__()
        if r < 1 or lora_alpha <= 0 or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(
                f"r={r} must be >= 1, lora_alpha={lora_alpha} > 0 and lora_dropout={lora_dropout} in [0, 1)."
            )
        if warmup_steps < 0 or learning_rate <= 0:
            raise ValueError(
                f"warmup_steps={warmup_steps} must be >= 0 and learning_rate={learning_rate} > 0."
            )
        resolve_dtype(dtype)  # fail at parse time, not after the model download
        if is_adapter(model):
            raise ValueError(
                f"model={model!r} is a LoRA adapter; fine-tuning starts from a whole model. Fix: give its base "
                "(adapter_config.json's base_model_name_or_path), or merge the adapter and save the model first."
            )
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        self.save_hyperparameters()
        self.val_loss = MeanMetric()
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.strict_loading = False  # checkpoints carry the adapter only; the base comes from `model`

    # ---- model -------------------------------------------------------------------------------------

    def _check_qlora_possible(self) -> None:
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if device.type != "cuda":
            raise RuntimeError(
                f"load_in_4bit=True (QLoRA) needs a CUDA device, but this run is on {device.type!r}. "
                "Fix: run on a GPU (trainer.accelerator: gpu), or set load_in_4bit: false for LoRA on a "
                "float32/bfloat16 base."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("load_in_4bit=True needs bitsandbytes. Fix: pip install -e '.[qlora]'.")
        plugins = type(self.trainer.precision_plugin).__name__
        if "Bitsandbytes" in plugins:
            raise RuntimeError(
                "Lightning's bitsandbytes precision plugin would quantise the LoRA adapters too. "
                "Fix: remove it from trainer.plugins and use load_in_4bit: true on the model instead."
            )

    def _load_base(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(hp.dtype), "trust_remote_code": hp.trust_remote_code}
        if hp.load_in_4bit:
            from transformers import BitsAndBytesConfig

            compute = resolve_dtype(hp.dtype)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if compute == torch.float32 else compute,
            )
            kwargs["device_map"] = {
                "": self.trainer.strategy.root_device
            }  # 4-bit weights are placed at load time
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(hp.model), **kwargs)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        hp = self.hparams
        if hp.load_in_4bit:
            self._check_qlora_possible()
        self.tokenizer = load_tokenizer(
            hp.model, padding_side="right", trust_remote_code=hp.trust_remote_code
        )
        base = self._load_base()
        check_target_modules(base, hp.target_modules)
        if hp.load_in_4bit:
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=hp.r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            use_rslora=hp.use_rslora,
            target_modules=hp.target_modules,
            bias="none",
        )
        self.model = get_peft_model(base, config)  # freezes the base, adapters in float32
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modules' modes as found
        if self.device_mesh is not None:  # Lightning's ModelParallelStrategy: shard with FSDP2
            self._fully_shard(self.device_mesh)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        log.info(
            "LoRA on %s: %d trainable of %d parameters (%.3f%%)",
            hp.model,
            trainable,
            total,
            100 * trainable / total,
        )

    def _fully_shard(self, mesh) -> None:
        """FSDP2 (``fully_shard``) per decoder block, then the whole model, over the data-parallel mesh.

        The module tree stays as it was (blocks become ``FSDP<Block>`` subclasses), so :mod:`persona.hooks` finds
        the blocks and the steering/ablation/monitor callbacks hook them as usual; frozen base weights and
        float32 adapters shard together. Tensor parallelism is not supported.
        """
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise PersonaError(
                f"trainer.strategy ModelParallelStrategy (FSDP2) needs torch >= 2.6, found {torch.__version__}. "
                "Fix: upgrade torch, or use trainer.strategy ddp (or fsdp)."
            ) from None

        from persona.hooks import locate_blocks

        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "persona fit shards LoRA fine-tuning with FSDP2 only. Fix: "
                "ModelParallelStrategy(tensor_parallel_size=1, data_parallel_size=<devices>)."
            )
        data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        layout = locate_blocks(self.model)
        for block in layout.blocks:
            fully_shard(block, mesh=data_parallel)
        # The root is the transformers model under PEFT: its generate() calls it directly, not the PeftModel, and
        # FSDP2 gathers the root's own weights (embeddings, head) only when the root module itself is called.
        fully_shard(layout.model, mesh=data_parallel)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_model = getattr(getattr(datamodule, "hparams", None), "model", None)
        if data_model is not None and data_model != self.hparams.model:
            log.warning(
                "data.model=%r differs from model.model=%r: make sure they share a tokenizer.",
                data_model,
                self.hparams.model,
            )

    # ---- steps -------------------------------------------------------------------------------------

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss over the batch's assistant tokens (the LM head only where labelled)."""
        return causal_lm_loss(self.model, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        if not bool(torch.isfinite(loss)):  # one scalar sync; the progress bar reads the loss anyway
            raise PersonaError(
                f"the training loss is {float(loss)} at step {self.trainer.global_step} (batch {batch_idx}), so "
                "training stopped; no adapter or checkpoint of this state is saved. Fix: check the steering/"
                "ablation vectors and coefficients, the learning rate and the precision."
            )
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.batch_loss(batch)
        tokens = (batch["labels"][:, 1:] != -100).sum()  # the positions HF's shifted loss averages over
        # Token-weighted over the whole set and all ranks (torchmetrics reduces sums and weights separately).
        self.val_loss.update(loss.detach(), weight=tokens)
        self.log("val_loss", self.val_loss, prog_bar=True)

    # ---- optimisation ------------------------------------------------------------------------------

    def to(self, *args: Any, **kwargs: Any) -> LoRAFineTune:
        """Like ``nn.Module.to``, but a dtype cast leaves the float32 adapters untouched.

        A ``bf16-true``/``16-true`` precision plugin casts the whole module with ``.to(dtype=...)``
        after a checkpoint is restored; AdamW steps of ~1e-5 would round away in bfloat16 adapters (and
        restored values would lose precision). PEFT's LoRA layers cast their input to the adapter dtype
        and the result back, so float32 adapters on a bfloat16 base work.
        """
        dtype = _target_dtype(args, kwargs)
        if dtype is None or not dtype.is_floating_point or self.model is None:
            return super().to(*args, **kwargs)
        adapters = {
            name: p.data
            for name, p in self.named_parameters()
            if p.requires_grad and p.dtype == torch.float32
        }
        super().to(*args, **kwargs)
        for name, param in self.named_parameters():
            if name in adapters:
                param.data = adapters[name].to(param.device)
        return self

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(
                "No trainable parameters: LoRA found nothing to adapt. Fix: check target_modules."
            )
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError(
                "Training length is unbounded. Fix: set trainer.max_steps or trainer.max_epochs."
            )
        scheduler = get_linear_schedule_with_warmup(optimizer, hp.warmup_steps, int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints: adapter only -----------------------------------------------------------------

    def _trainable_keys(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def _check_adapter_finite(self) -> None:
        bad = [
            name
            for name, p in self.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(p).all())
        ]
        if bad:
            raise PersonaError(
                f"{len(bad)} adapter tensor(s) hold NaN or infinite values (e.g. {bad[0]}); refusing to save them. "
                "Fix: check the steering/ablation vectors, the learning rate and the precision."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_adapter_finite()
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["adapter_only"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is None:  # ModelParallelStrategy (FSDP2) loads the weights itself and takes them out first
            return
        expected = self._trainable_keys()
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if checkpoint.get("adapter_only") and (missing or unexpected):
            raise ValueError(
                f"The checkpoint's adapter does not match this LoRA configuration ({len(missing)} missing, "
                f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]}). "
                "Fix: resume with the same model, r and target_modules as the run that wrote it."
            )

    # ---- final adapter -----------------------------------------------------------------------------

    def resolved_adapter_dir(self) -> Path:
        if self.hparams.adapter_dir:
            return Path(self.hparams.adapter_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter"

    def _adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors whole, named as in the PEFT model; every rank must call it (FSDP gathers here).

        FSDP2 (ModelParallelStrategy) keeps each parameter as a ``DTensor`` shard: ``full_tensor()`` gathers it.
        FSDP1 (FSDPStrategy) keeps flat shards: ``summon_full_params`` on Lightning's FSDP root gathers them (on
        CPU, for rank 0 only).
        """
        from contextlib import nullcontext

        from torch.distributed.fsdp import FullyShardedDataParallel

        root = getattr(self.trainer.strategy, "model", None)
        gather = (
            FullyShardedDataParallel.summon_full_params(
                root, writeback=False, rank0_only=True, offload_to_cpu=True
            )
            if isinstance(root, FullyShardedDataParallel)
            else nullcontext()
        )
        state = {}
        with gather:
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    full = param.full_tensor() if hasattr(param, "full_tensor") else param
                    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
                        name = name.replace(wrapper, "")  # FSDP1 units and activation checkpointing
                    state[name] = full.detach().clone()
        return state

    def on_train_end(self) -> None:
        state = self._adapter_state_dict()  # on every rank: under FSDP the shards are gathered here
        if not self.trainer.is_global_zero:
            return
        self._check_adapter_finite()
        target = self.resolved_adapter_dir()
        # The base as the user named it (an alias or hub id), not this machine's cache path: the adapter moves.
        for config in getattr(self.model, "peft_config", {}).values():
            config.base_model_name_or_path = self.hparams.model
        # No full embedding layers (persona never resizes the vocabulary); "auto" would look the base up by name.
        self.model.save_pretrained(target, state_dict=state, save_embedding_layers=False)
        self.tokenizer.save_pretrained(target)
        log.warning(
            "Saved the LoRA adapter to %s (load with peft.PeftModel.from_pretrained(base, %r))",
            target,
            str(target),
        )
