"""report.md of a demo run, written from the run's ``results.json`` (so `persona report` can redo it)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from persona.errors import PersonaError
from persona.report import markdown_table, relative
from persona.store import atomic_write, read_json, write_csv

TARGET_AUC = 0.95
TARGET_R = 0.9


def link(path: str, run: Path) -> str:
    rel = relative(path, run)
    return f"[`{rel}`]({rel})"


def vector_sections(results: dict, run: Path) -> list[str]:
    lines = []
    for name, result in results["traits"].items():
        layer_info, sweep = result["layers"], result["sweep"]
        reached = "reached" if layer_info["auc"] >= TARGET_AUC else "**NOT reached**"
        lines += [
            f"## {name}: vectors from contrastive pairs",
            "",
            f"**Layer analysis.** Recommended layer **{layer_info['recommended']}**: held-out AUC "
            f"**{layer_info['auc']:.3f}** (target ≥ {TARGET_AUC}: {reached}), normalised separation "
            f"{layer_info['separation']:.2f}. Per layer: {link(layer_info['csv'], run)}.",
            "",
            f"![layer metrics]({relative(layer_info['png'], run)})",
            "",
            f"**Judge-free steering sweep** at layer {sweep['layer']} (all positions): mean per-token "
            "log-likelihood of the trait-positive response minus the negative one, on held-out pairs. "
            f"Monotone over the grid: **{'yes' if sweep['monotone'] else 'NO'}**. Numbers: {link(sweep['csv'], run)}.",
            "",
            markdown_table(pd.DataFrame(sweep["table"])),
            "",
            f"![likelihood sweep]({relative(sweep['png'], run)})",
            "",
        ]
    return lines


def generated_section(generated: dict, trait: str, run: Path) -> list[str]:
    return [
        f"## {trait}: the paper's route — persona-prompted answers judged by the local judge",
        "",
        f"{generated['rows_per_side']} answers per side (system prompt with the trait's positive or negative "
        "instruction), each judged for the trait and for coherence by the embedded model "
        "(`--judge_min_mass 0`: its expected number given a numeric answer; a 135M judge is weak, so read "
        "these scores as a demonstration of the pipeline, not as measurements).",
        "",
        markdown_table(
            pd.DataFrame(
                [
                    {
                        "side": side,
                        "trait score mean": generated[f"{side}_trait_mean"],
                        "coherence mean": generated[f"{side}_coherence_mean"],
                    }
                    for side in ("pos", "neg")
                ]
            )
        ),
        "",
        f"Filter used for extraction: {generated['filter']}. Cosine similarity of the resulting "
        f"response-average vector with the pairs vector at the recommended layer: "
        f"**{generated['cosine_with_pairs_vector']:.3f}**. CSVs: {link(generated['pos_csv'], run)}, "
        f"{link(generated['neg_csv'], run)}.",
        "",
    ]


def finetune_section(study: dict, run: Path) -> list[str]:
    correlation = study["correlation"]
    r = correlation["r"]
    r_text = (
        "undefined"
        if r != r
        else f"{r:.3f} (95% CI {correlation['ci_low']:.2f}..{correlation['ci_high']:.2f})"
    )
    reached = "reached" if r == r and r >= TARGET_R else "**NOT reached**"
    auc = study.get("screen_auc")
    auc_text = "not computed" if auc is None else f"{auc:.3f}"
    auc_reached = "reached" if auc is not None and auc >= TARGET_AUC else "**NOT reached**"
    shift = pd.read_csv(study["shift_csv"])
    columns = [
        "run",
        "trait_share",
        "shift_prompt_last",
        "shift_response_avg",
        "trait_score",
        "trait_score_change",
    ]
    return [
        "## Fine-tuning study",
        "",
        f"LoRA runs ({', '.join(study['runs'])}) on chat data with growing shares of trait-eliciting answers "
        "(`mix_<share>`; `+steer` = preventative steering, `+caft` = concept ablation, both on the all-trait "
        "mixture and left out of the correlation). The activation "
        "monitor measured the projection on the persona vector before training (epoch 0) and after each epoch; "
        f"TensorBoard logs: `{relative(study['tensorboard'], run)}` (`tensorboard --logdir` it). "
        f"Numbers: {link(study['monitor_csv'], run)}.",
        "",
        f"![monitor]({relative(study['monitor_png'], run)})",
        "",
        f"**Finetuning shift vs trait score.** Pearson r over the mixture runs (n = {correlation['n']}): "
        f"**{r_text}** (target ≥ {TARGET_R}: {reached}). Numbers: {link(study['shift_csv'], run)}.",
        "",
        markdown_table(shift[columns]),
        "",
        f"![shift]({relative(study['shift_png'], run)})",
        "",
        f"**ΔP screening** of `mix_0.5` before any training (trait-eliciting vs normal samples): AUC "
        f"**{auc_text}** (target ≥ {TARGET_AUC}: {auc_reached}). Files: `{relative(study['screen_summary'], run)}/`.",
        "",
    ]


def write_report(run: Path) -> Path:
    results = read_json(run / "results.json", what="demo results file")
    info, trait = results["model"], results["trait"]
    lines = [
        "# persona demo report",
        "",
        f"Model: `{info['model']}` ({info['layers']} layers, hidden size {info['hidden']}), offline on CPU. "
        f"Sanity check — *What is the capital of France?* → “{info['answer']}”",
        "",
        "Vectors are response-average mean differences from the **train** split; every separation and "
        "steering number is measured on the held-out **test** split.",
        "",
        *vector_sections(results, run),
    ]
    if results.get("generated"):
        lines += generated_section(results["generated"], trait, run)
    generations = results["generations"]
    frame = pd.read_csv(generations["csv"])
    wide = frame.pivot(index="prompt", columns="coef", values="answer").reset_index()
    wide.columns = ["prompt"] + [f"coef {c:+g}" for c in wide.columns[1:]]
    lines += [
        f"## Steered generations ({trait}, layer {generations['layer']}, `response` positions, greedy)",
        "",
        markdown_table(wide),
        "",
        f"Numbers: {link(generations['csv'], run)}.",
        "",
    ]
    if results.get("finetune"):
        lines += finetune_section(results["finetune"], run)
    lines += [
        "## Export",
        "",
        f"llama.cpp control vector: `{relative(results['export']['gguf'], run)}` "
        "(`llama-cli --control-vector-scaled FILE COEF`).",
        "",
        "## Timings",
        "",
        "Phases reused from an earlier invocation show the time they took then.",
        "",
        markdown_table(
            pd.DataFrame([{"phase": k, "seconds": v} for k, v in results["timings"].items()]), floatfmt=".1f"
        ),
        "",
    ]
    lines += ["## Targets", "", markdown_table(summary_table(results)), ""]
    if results.get("not_run"):
        lines += ["## Not run", "", *[f"- {item}" for item in results["not_run"]], ""]
    path = run / "report.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))
    write_csv(run / "summary.csv", summary_table(results))
    return path


def shown(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3f}"
    return "not measured" if value is None else str(value)


def summary_table(results: dict) -> pd.DataFrame:
    rows = [
        {
            "measure": f"{name}: held-out AUC at layer {r['layers']['recommended']}",
            "value": r["layers"]["auc"],
            "target": f">= {TARGET_AUC}",
        }
        for name, r in results["traits"].items()
    ]
    rows += [
        {
            "measure": f"{name}: likelihood score monotone over coefficients",
            "value": r["sweep"]["monotone"],
            "target": "yes",
        }
        for name, r in results["traits"].items()
    ]
    total = results.get("timings", {}).get("total (this invocation)")
    if total is not None:
        rows.append(
            {
                "measure": "wall time of this invocation, s (reused phases not counted)",
                "value": total,
                "target": "<= 600 (whole demo)",
            }
        )
    if results.get("peak_memory_gib") is not None:
        rows.append({"measure": "peak memory, GiB", "value": results["peak_memory_gib"], "target": "<= 4"})
    study = results.get("finetune")
    if study:
        rows.append(
            {
                "measure": f"finetuning shift vs trait score, Pearson r (n={study['correlation']['n']})",
                "value": study["correlation"]["r"],
                "target": f">= {TARGET_R}",
            }
        )
        rows.append(
            {"measure": "ΔP screening AUC", "value": study.get("screen_auc"), "target": f">= {TARGET_AUC}"}
        )
    frame = pd.DataFrame(rows)
    frame["value"] = frame["value"].map(shown)
    return frame


def report(run_dir: str = "runs/demo") -> str:
    """Rewrite report.md (and summary.csv) of a demo run directory from its results.json.

    Args:
        run_dir: A run directory written by `persona demo`.
    """
    run = Path(run_dir)
    if not (run / "results.json").is_file():
        raise PersonaError(
            f"{run / 'results.json'} not found. Fix: run `persona demo --run_dir {run_dir}` first."
        )
    try:
        path = write_report(run)
    except (KeyError, TypeError, IndexError) as error:
        raise PersonaError(
            f"{run / 'results.json'}: incomplete or from another version (no {error}). "
            f"Fix: re-run `persona demo --run_dir {run_dir}` (finished phases are reused)."
        ) from None
    print(f"Report: {path}")
    return str(path)
