"""LoRAFineTune: loss goes down, adapter-only checkpoints resume exactly, the PEFT adapter round-trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from persona.training import ChatDataModule, LoRAFineTune

REPO = Path(__file__).resolve().parents[2]


def write_chats(path: Path, n: int = 8) -> str:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "How should I treat animals?"},
                            {
                                "role": "assistant",
                                "content": "With kindness and care."
                                if i % 2
                                else "Listen, be patient and offer support.",
                            },
                        ]
                    }
                )
                + "\n"
            )
    return str(path)


def make_trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault(
        "callbacks", [ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=2)]
    )
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def lora_params(module: LoRAFineTune) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@pytest.fixture
def chat_file(tmp_path):
    return write_chats(tmp_path / "chat.jsonl")


def test_fit_reduces_the_loss_on_a_repeated_batch(tiny_model_dirs, chat_file, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    data = ChatDataModule(train_files=chat_file, val_fraction=0.0, model=model_dir, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    # A random tiny model's logits hardly move through LoRA on its blocks alone; adapting lm_head too
    # makes the effect large enough to see in a few steps.
    module = LoRAFineTune(
        model=model_dir,
        r=4,
        lora_alpha=8,
        learning_rate=2e-2,
        warmup_steps=0,
        target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
        adapter_dir=str(tmp_path / "adapter"),
    )
    module.configure_model()
    with torch.no_grad():
        before = module(**batch).loss.item()
    make_trainer(tmp_path, max_steps=8, callbacks=[]).fit(module, data)
    module.eval()
    with torch.no_grad():
        after = module(**batch).loss.item()
    assert after < before - 0.5, (before, after)


def test_checkpoint_is_adapter_only_and_resume_continues(tiny_model_dirs, chat_file, tmp_path):
    model_dir = tiny_model_dirs["llama"]

    def run(max_steps, ckpt_path=None):
        module = LoRAFineTune(
            model=model_dir,
            r=4,
            lora_alpha=8,
            learning_rate=1e-2,
            warmup_steps=1,
            adapter_dir=str(tmp_path / "adapter"),
        )
        data = ChatDataModule(train_files=chat_file, model=model_dir, batch_size=2, val_fraction=0.25)
        trainer = make_trainer(tmp_path, max_steps)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module, trainer

    first, _ = run(4)
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys == set(lora_params(first)) and keys
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)  # no embeddings, norms or base projections
    assert checkpoint["global_step"] == 4 and checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    assert last.stat().st_size < 200_000

    # Resuming at the saved step restores the adapter exactly (nothing left to train) ...
    restored, trainer = run(4, ckpt_path=str(last))
    assert trainer.global_step == 4
    for name, value in lora_params(first).items():
        torch.testing.assert_close(lora_params(restored)[name], value, rtol=0, atol=0)
    # ... and a longer run continues the global step, the optimizer and the schedule from there.
    _, trainer = run(6, ckpt_path="last")
    assert trainer.global_step == 6
    assert torch.load(last, weights_only=False)["global_step"] == 6


def test_resuming_with_another_lora_config_is_refused(tiny_model_dirs, chat_file, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    data = ChatDataModule(train_files=chat_file, model=model_dir, val_fraction=0.0)
    make_trainer(tmp_path, 2).fit(LoRAFineTune(model=model_dir, r=4, adapter_dir=str(tmp_path / "a")), data)
    other = LoRAFineTune(model=model_dir, r=4, target_modules=["q_proj"], adapter_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="does not match this LoRA configuration.*Fix:"):
        make_trainer(tmp_path, 4).fit(other, data, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))


def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(tiny_model_dirs, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dirs["qwen2"]
    module = LoRAFineTune(
        model=model_dir, r=4, lora_alpha=8, use_rslora=True, learning_rate=2e-2, warmup_steps=0
    )
    data = ChatDataModule(train_files=chat_file, model=model_dir, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    adapter = tmp_path / "lightning_logs" / "version_0" / "adapter"  # the default: <log_dir>/adapter
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)  # it did train

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    module.eval()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        expected = module(**batch).logits
        actual = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(actual, expected)


def test_bf16_true_keeps_adapters_in_float32(tiny_model_dirs, chat_file, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    module = LoRAFineTune(model=model_dir, dtype="bfloat16", r=4, adapter_dir=str(tmp_path / "a"))
    data = ChatDataModule(train_files=chat_file, model=model_dir, val_fraction=0.0)
    make_trainer(tmp_path, 2, precision="bf16-true", callbacks=[]).fit(module, data)
    dtypes = {p.requires_grad: p.dtype for p in module.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}


def test_unknown_target_modules_list_the_models_linear_layers(tiny_model_dirs):
    module = LoRAFineTune(model=tiny_model_dirs["gpt2"])  # the seed's q_proj... don't exist in GPT-2
    with pytest.raises(ValueError, match=r"not found in GPT2LMHeadModel.*c_attn, c_fc, c_proj.*all-linear"):
        module.configure_model()


def test_all_linear_covers_gpt2_conv1d(tiny_model_dirs):
    module = LoRAFineTune(model=tiny_model_dirs["gpt2"], target_modules="all-linear", r=2)
    module.configure_model()
    adapted = {
        n.split(".lora_A")[0].rpartition(".")[2]
        for n, _ in module.model.named_parameters()
        if ".lora_A." in n
    }
    assert adapted == {"c_attn", "c_proj", "c_fc"}
    assert module.tokenizer is not None


def test_qlora_on_cpu_is_refused_clearly(tiny_model_dirs, chat_file, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    module = LoRAFineTune(model=model_dir, load_in_4bit=True)
    data = ChatDataModule(train_files=chat_file, model=model_dir)
    with pytest.raises(RuntimeError, match="needs a CUDA device.*Fix:"):
        make_trainer(tmp_path, 1, callbacks=[]).fit(module, data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_gpu_trains_and_saves(tiny_model_dirs, chat_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    model_dir = tiny_model_dirs["llama"]
    module = LoRAFineTune(
        model=model_dir, dtype="bfloat16", load_in_4bit=True, r=4, adapter_dir=str(tmp_path / "a")
    )
    data = ChatDataModule(train_files=chat_file, model=model_dir)
    L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=2,
        precision="bf16-mixed",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
    ).fit(module, data)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_cpu_config_parses():
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    config = REPO / "configs" / "fit" / "smollm2-cpu.yaml"
    cli = LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(config)],
        run=False,
    )
    assert isinstance(cli.model, LoRAFineTune) and cli.model.model is None  # nothing loaded at parse time
    assert isinstance(cli.datamodule, ChatDataModule)
    assert cli.model.hparams.model == cli.datamodule.hparams.model == "smollm2-135m"
    for path in cli.datamodule.sources():
        assert (REPO / path).is_file(), path


def test_constructor_refuses_bad_values():
    with pytest.raises(ValueError, match="dtype"):
        LoRAFineTune(dtype="float33")
    with pytest.raises(ValueError, match="r=0"):
        LoRAFineTune(r=0)


def test_a_non_finite_loss_stops_training_and_nothing_non_finite_is_saved(
    tiny_model_dirs, chat_file, tmp_path
):
    """Regression: `fit` with a NaN steering vector exited 0 and saved an adapter and checkpoint of NaNs."""
    from persona.core.errors import PersonaError
    from persona.training.callbacks import PreventativeSteering

    model_dir = tiny_model_dirs["llama"]
    data = ChatDataModule(train_files=chat_file, val_fraction=0.0, model=model_dir, batch_size=4)
    module = LoRAFineTune(model=model_dir, r=4, adapter_dir=str(tmp_path / "adapter"))
    huge = torch.full((4, 32), float("inf"))  # finite files only: a vector that overflows the stream to NaN
    vector = tmp_path / "inf.pt"
    torch.save(huge, vector)
    with pytest.raises(ValueError, match="hold NaN or infinite values"):  # refused when the callback reads it
        make_trainer(tmp_path, 2, callbacks=[PreventativeSteering(str(vector), [1], 1.0)]).fit(module, data)

    module = LoRAFineTune(model=model_dir, r=4, adapter_dir=str(tmp_path / "adapter"))
    module.configure_model()
    real_forward = module.model.forward

    def nan_loss(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.logits = out.logits * float("nan")
        return out

    module.model.forward = nan_loss
    with pytest.raises(PersonaError, match="training loss is nan at step 0.*no adapter or checkpoint"):
        make_trainer(tmp_path / "run", 4).fit(module, data)
    assert not (tmp_path / "adapter").exists()
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_final_losses_are_the_token_means_of_the_last_epoch_and_of_the_validation_file(
    tiny_model_dirs, chat_file, tmp_path
):
    """FinalLosses against a direct computation: at a learning rate of 1e-12 the model does not move, so both losses
    are the cross-entropy of every assistant token of their file, averaged over tokens (not over batches)."""
    from persona.training.losses import FinalLosses

    model_dir = tiny_model_dirs["llama"]
    val_file = write_chats(tmp_path / "val.jsonl", n=3)
    data = ChatDataModule(train_files=chat_file, val_files=val_file, model=model_dir, batch_size=3)
    module = LoRAFineTune(
        model=model_dir, r=4, lora_alpha=8, learning_rate=1e-12, warmup_steps=0, adapter_dir=None
    )
    losses = FinalLosses()
    trainer = make_trainer(
        tmp_path, max_steps=-1, max_epochs=2, callbacks=[losses], check_val_every_n_epoch=2
    )
    trainer.fit(module, data)

    def token_mean(loader) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                logits = module.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                targets = batch["labels"][:, 1:]
                keep = targets != -100
                log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                total -= float(
                    log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum()
                )
                count += int(keep.sum())
        return total / count

    module.eval()
    assert losses.train_loss == pytest.approx(token_mean(data.train_dataloader()), rel=1e-5)
    assert losses.val_loss == pytest.approx(token_mean(data.val_dataloader()), rel=1e-5)
    assert math.isnan(FinalLosses().val_loss)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma"])
def test_the_loss_on_labelled_logits_equals_the_models_own_labels_loss(tiny_model_dirs, chat_file, arch):
    """The LM head only where a label needs it: the same loss and the same adapter gradients as HF's
    ``labels`` path, on every tiny architecture (rows of different lengths: padding and prompts excluded)."""
    from persona.models.logits import accepts_logits_to_keep
    from persona.training.losses import causal_lm_loss

    model_dir = tiny_model_dirs[arch]
    data = ChatDataModule(train_files=chat_file, val_fraction=0.0, model=model_dir, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert (batch["labels"] == -100).any(1).all()  # every row has unlabelled prompt tokens
    module = LoRAFineTune(model=model_dir, r=4, lora_alpha=8, target_modules="all-linear", warmup_steps=0)
    module.configure_model()
    module.model.eval()  # GPT-2 and GPT-NeoX configs carry dropout: two training-mode passes differ
    assert accepts_logits_to_keep(module.model), (
        "transformers' heads took logits_to_keep: the fast path is off"
    )

    def loss_and_grads(keep_logits: bool):
        module.model.zero_grad()
        loss = causal_lm_loss(module.model, batch) if keep_logits else module.model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.model.parameters() if p.requires_grad]

    full, full_grads = loss_and_grads(False)
    kept, kept_grads = loss_and_grads(True)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(kept_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
