"""The study's fine-tuning study: LoRA runs on mixtures with growing shares of trait-eliciting data.

Each run is monitored along the persona vector per epoch (TensorBoard + monitor.csv). Two extra runs
on the all-trait mixture add preventative steering or CAFT. Then: finetuning shift vs trait score
across the mixture runs (Pearson r) and ΔP screening of one mixture before any training (AUC).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

from persona.study.runs import planned_runs, trait_share

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from persona.core.store import write_csv, write_figure  # noqa: E402


def train_run(
    run_dir: Path,
    name: str,
    train_file: Path,
    *,
    model: str,
    vector_path: str,
    layer: int,
    eval_file: Path,
    epochs: int,
    extra_callbacks: list,
    hardware,
    val_file: Path | None = None,
    monitor_start: dict | None = None,
) -> dict:
    """One LoRA fine-tuning run with the activation monitor; returns its adapter dir, monitor table and final
    losses (the last epoch's training loss; the loss on ``val_file`` after the last epoch, NaN without one)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from persona.core.hardware import precision_for, resolve_dtype
    from persona.training import ChatDataModule, LoRAFineTune
    from persona.training.losses import FinalLosses
    from persona.training.monitor import ActivationMonitor

    L.seed_everything(0, verbose=False)
    adapter_dir = run_dir / name / "adapter"
    dtype = resolve_dtype(hardware.dtype)
    module = LoRAFineTune(
        model=model,
        r=8,
        lora_alpha=16,
        learning_rate=1e-3,
        warmup_steps=0,
        adapter_dir=str(adapter_dir),
        dtype=str(dtype).removeprefix("torch."),
    )
    data = ChatDataModule(
        train_files=[str(train_file)],
        val_files=[str(val_file)] if val_file else None,
        val_fraction=0.0,
        model=model,
        batch_size=4,
        max_length=160,
    )
    losses = FinalLosses()
    monitor = ActivationMonitor(
        vector_paths=[vector_path], layers=[layer], eval_file=str(eval_file), every_n_epochs=1
    )
    if monitor_start is not None:  # an earlier run's reading of the same base before training
        monitor.reuse_start(monitor_start)
    logger = TensorBoardLogger(save_dir=str(run_dir / "tensorboard"), name=name, version="")
    trainer = L.Trainer(
        accelerator=hardware.accelerator,
        devices=1,
        precision=precision_for(dtype),
        max_epochs=epochs,
        logger=logger,
        callbacks=[monitor, losses, *extra_callbacks],
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=1.0 if val_file else 0,
        check_val_every_n_epoch=epochs,  # once, after the last epoch: the run's final cost
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data)
    history = pd.DataFrame(monitor.history)
    history.insert(0, "run", name)
    return {
        "adapter": str(adapter_dir),
        "history": history,
        "monitor_start": monitor.start_values,
        "train_loss": losses.train_loss,
        "val_loss": losses.val_loss,
    }


def finetune_study(
    phase_dir: Path,
    *,
    model: str,
    trait: str,
    pairs_path: Path,
    artifact: str,
    vector_path: str,
    layer: int,
    sizes,
    hardware,
    base_metrics_csv: str | None = None,
) -> dict:
    """``trait`` names the data; ``pairs_path`` gives the mixtures' answers and the held-out scores, ``artifact``
    (a trait name or artifact folder) the eval questions the monitor and the shift read."""
    data_dir = phase_dir / "data"
    runs = train_mixtures(phase_dir, data_dir, model=model, trait=trait, pairs_path=pairs_path, artifact=artifact,
                          vector_path=vector_path, layer=layer, sizes=sizes, hardware=hardware)  # fmt: skip
    # Short answers are enough to measure shift and ΔP; the full length would dominate the study's time.
    answer_tokens = min(sizes.max_new_tokens, 32)
    shift_result, correlation = shift_study(
        phase_dir,
        runs,
        model=model,
        trait=artifact,
        pairs_path=pairs_path,
        vector_path=vector_path,
        layer=layer,
        answer_tokens=answer_tokens,
        hardware=hardware,
    )
    screened = screen_mixture(
        phase_dir,
        data_dir / "mix_0.5.jsonl",
        model=model,
        vector_path=vector_path,
        layer=layer,
        answer_tokens=answer_tokens,
        hardware=hardware,
    )
    representation = None
    if base_metrics_csv is not None:  # the base model's layer metrics on the same held-out pairs
        from persona.study.representation import representation_study

        representation = representation_study(
            phase_dir, {name: run["adapter"] for name, run in runs.items()}, model=model, trait=trait,
            pairs_path=pairs_path, base_vector_path=vector_path, base_metrics_csv=base_metrics_csv,
            hardware=hardware, batch_size=sizes.batch_size,
        )  # fmt: skip
    return {
        "representation": representation,
        "runs": list(runs),
        "monitor_csv": str(phase_dir / "monitor.csv"),
        "monitor_png": str(phase_dir / "monitor.png"),
        "tensorboard": str(phase_dir / "tensorboard"),
        "shift_csv": str(phase_dir / "shift_by_run.csv"),
        "shift_png": str(phase_dir / "shift_vs_score.png"),
        "correlation": correlation,
        "screen_auc": screened.get("auc"),
        "screen_summary": str(phase_dir / "screen"),
        "shift_raw": {k: v for k, v in shift_result.items() if isinstance(v, (int, float, str))},
    }


def train_mixtures(
    phase_dir: Path, data_dir: Path, *, model: str, trait: str, pairs_path: Path, artifact: str, vector_path: str,
    layer: int, sizes, hardware,
) -> dict:  # fmt: skip
    """One LoRA run per planned mixture and arm (monitored), one after another; monitor.csv/png of them all."""
    from persona.core.hardware import release_memory
    from persona.data.build import dataset
    from persona.data.traits import load_trait

    mixtures = tuple(sizes.finetune_mixtures)
    dataset(
        trait=trait,
        pairs_path=str(pairs_path),
        output_dir=str(data_dir),
        mix=list(mixtures),
        n=sizes.finetune_samples,
        split="train",
        overwrite=True,
    )
    val_dir = validation_sets(
        data_dir / "val", trait=trait, pairs_path=pairs_path, mixtures=mixtures, sizes=sizes
    )
    common = dict(
        model=model,
        vector_path=vector_path,
        layer=layer,
        eval_file=load_trait(artifact, "eval").path,
        epochs=sizes.finetune_epochs,
        hardware=hardware,
    )
    runs = {}
    for share, name, callbacks in planned_runs(mixtures, sizes, vector_path, layer):
        val_file = val_dir / f"mix_{share:g}.jsonl" if val_dir else None
        # Every run starts from the same base with a fresh adapter: the first run's reading before training is
        # every run's (the intervention callbacks' hooks are paused while the monitor reads).
        start = next(iter(runs.values()))["monitor_start"] if runs else None
        runs[name] = train_run(
            phase_dir, name, data_dir / f"mix_{share:g}.jsonl", extra_callbacks=callbacks, val_file=val_file,
            monitor_start=start, **common,
        )  # fmt: skip
        release_memory()  # the run's model and trainer, before the next run loads its own

    monitor = pd.concat([run["history"] for run in runs.values()], ignore_index=True)
    write_csv(phase_dir / "monitor.csv", monitor)
    plot_monitor(monitor, phase_dir / "monitor.png", layer)
    return runs


def validation_sets(out: Path, *, trait: str, pairs_path: Path, mixtures: tuple, sizes) -> Path | None:
    """Each mixture again from the held-out (test) pairs: the validation loss of the runs trained on it. None, with
    a warning, when the pairs have no test split."""
    import logging

    from persona.core.errors import PersonaError
    from persona.data.build import dataset

    try:
        dataset(trait=trait, pairs_path=str(pairs_path), output_dir=str(out), mix=list(mixtures),
                n=max(4, sizes.finetune_samples // 3), split="test", overwrite=True)  # fmt: skip
    except (PersonaError, ValueError) as error:
        logging.getLogger(__name__).warning("No validation loss for the fine-tuning runs: %s", error)
        return None
    return out


def shift_study(
    phase_dir: Path,
    runs: dict,
    *,
    model: str,
    trait: str,
    pairs_path: Path,
    vector_path: str,
    layer: int,
    answer_tokens: int,
    hardware,
) -> tuple[dict, dict]:
    """Finetuning shift of every run against its trait-score change; Pearson r over the mixture runs (CSV + PNG)."""
    from persona.commands.shift import shift

    result = shift(
        base_model=model,
        finetuned=[run["adapter"] for run in runs.values()],
        vector_path=vector_path,
        layer=layer,
        trait=trait,
        output_dir=str(phase_dir / "shift"),
        overwrite=True,  # the caller decides when to recompute
        pairs_path=str(pairs_path),
        split="test",
        max_new_tokens=answer_tokens,
        accelerator=hardware.accelerator,
        dtype=hardware.dtype,
    )
    table = pd.read_csv(phase_dir / "shift" / "shift.csv")
    table.insert(0, "run", list(runs))
    table.insert(1, "trait_share", [trait_share(name) for name in runs])
    table["train_loss"] = [run["train_loss"] for run in runs.values()]
    table["val_loss"] = [run["val_loss"] for run in runs.values()]
    write_csv(phase_dir / "shift_by_run.csv", table)
    mixture_runs = [name for name in runs if "+" not in name]
    correlation = correlate(table[table["run"].isin(mixture_runs)])
    write_csv(phase_dir / "shift_correlation.csv", pd.DataFrame([correlation]))
    plot_shift(table, correlation, phase_dir / "shift_vs_score.png")
    return result, correlation


def screen_mixture(
    phase_dir: Path, mixture: Path, *, model: str, vector_path: str, layer: int, answer_tokens: int, hardware
) -> dict:
    """ΔP screening of one mixture before any training, scored against its is_trait labels."""
    from persona.commands.screen import screen

    return screen(
        data=str(mixture),
        vector_path=vector_path,
        layer=layer,
        model=model,
        labels_field="is_trait",
        max_new_tokens=answer_tokens,
        output_path=str(phase_dir / "screen" / f"{mixture.stem}.screened.jsonl"),
        overwrite=True,  # the caller decides when to recompute
        cache_path=str(phase_dir / "screen" / "base_responses.jsonl"),
        accelerator=hardware.accelerator,
        dtype=hardware.dtype,
    )


def correlate(table: pd.DataFrame) -> dict:
    """Pearson r between the prompt-last shift and the trait-score change, with n and a Fisher-z 95% CI."""
    from persona.analysis.shift import pearson_with_ci

    return {
        "x": "shift_prompt_last",
        "y": "trait_score_change",
        **pearson_with_ci(table["shift_prompt_last"].to_numpy(), table["trait_score_change"].to_numpy()),
    }


def plot_monitor(monitor: pd.DataFrame, path: Path, layer: int) -> None:
    kinds = [kind for kind in ("prompt_last", "response_avg") if (monitor["kind"] == kind).any()]
    figure, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), sharex=True, squeeze=False)
    axes = axes[0]
    for axis, kind in zip(axes, kinds, strict=True):
        part = monitor[monitor["kind"] == kind]
        for run, rows in part.groupby("run", sort=False):
            axis.plot(rows["epoch"], rows["mean"], marker="o", label=run)
        axis.set_title(f"{kind} projection, layer {layer}")
        axis.set_xlabel("epoch (0 = before training)")
    axes[0].set_ylabel("projection on the persona vector")
    axes[-1].legend(fontsize=7)
    write_figure(path, figure, dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_shift(table: pd.DataFrame, correlation: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for row in table.itertuples(index=False):
        axis.scatter(
            row.shift_prompt_last, row.trait_score_change, color="tab:red" if "+" in row.run else "tab:blue"
        )
        axis.annotate(row.run, (row.shift_prompt_last, row.trait_score_change), fontsize=7)
    axis.set_xlabel("finetuning shift (last prompt token, projected)")
    axis.set_ylabel("trait score change (likelihood preference)")
    axis.set_title(f"r = {correlation['r']:.2f} (n = {correlation['n']}) over mixture runs")
    write_figure(path, figure, dpi=120, bbox_inches="tight")
    plt.close(figure)
