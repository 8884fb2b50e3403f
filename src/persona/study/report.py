"""report.md of a study run, written from the run's ``results.json`` (so `persona report` can redo it),
and `persona report compare` for studies of several models side by side."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from persona.core.errors import PersonaError
from persona.core.store import write_csv, write_text
from persona.study.records import markdown_table, relative
from persona.study.results import read_results

TARGET_AUC = 0.95
TARGET_R = 0.9


def link(path: str, run: Path) -> str:
    rel = relative(path, run)
    return f"[`{rel}`]({rel})"


def reached(ok: bool) -> str:
    return "reached" if ok else "**missed**"


def vector_sections(results: dict, run: Path) -> list[str]:
    lines = []
    for name, result in results["traits"].items():
        lines += [f"## {name}", ""]
        for what, note in result.get("inputs", {}).items():
            lines += [f"*{'Questions' if what == 'questions' else 'Held-out pairs'}:* {note}.", ""]
        if "vectors" in result:
            lines += [f"Vectors: {link(result['vectors']['response_avg'], run)}.", ""]
        if result.get("layers"):
            lines += layers_section(result["layers"], run)
        if result.get("sweep"):
            lines += sweep_section(result["sweep"], run)
        if result.get("calibration"):
            lines += calibration_section(result["calibration"], run)
        if result.get("judged_sweep"):
            lines += judged_sweep_section(result["judged_sweep"], name, results, run)
        if result.get("generated"):
            lines += generated_section(result["generated"], name, run)
    return lines


def layers_section(layer_info: dict, run: Path) -> list[str]:
    examples = layer_info.get("examples", "held-out pairs")
    met = reached(layer_info["auc"] >= TARGET_AUC)
    return [
        f"**Layer analysis** on {examples}. Recommended layer **{layer_info['recommended']}**: AUC "
        f"**{layer_info['auc']:.3f}** (target ≥ {TARGET_AUC}: {met}), normalised separation "
        f"{layer_info['separation']:.2f}. Per layer: {link(layer_info['csv'], run)}.",
        "",
        f"![layer metrics]({relative(layer_info['png'], run)})",
        "",
    ]


def sweep_section(sweep: dict, run: Path) -> list[str]:
    return [
        f"**Judge-free steering sweep** at layer {sweep['layer']} (all positions): mean per-token "
        "log-likelihood of the trait-positive response minus the negative one, on "
        f"{sweep.get('pairs', 'held-out')} pairs. Monotone over the grid: **{'yes' if sweep['monotone'] else 'NO'}**. "
        f"Numbers: {link(sweep['csv'], run)}.",
        "",
        markdown_table(pd.DataFrame(sweep["table"])),
        "",
        f"![likelihood sweep]({relative(sweep['png'], run)})",
        "",
    ]


def calibration_section(calibration: dict, run: Path) -> list[str]:
    """The calibration phase's table: per layer the dose at the coherence target, its coef, the trait there."""
    best, proxies = calibration["recommended"], calibration["proxies"]
    target = best["target_coherence"]
    rows = [
        {"layer": row["layer"], "dose": row["dose"], "coef": row["coef"],
         f"trait at coherence {target:g}": row[f"trait_at_c{target:g}"], "coherence": row["coherence"],
         "rounds (probes)": row["probes"], "reached ±3": row["reached"], "recommended": row["recommended"]}
        for row in calibration["layers"]
    ]  # fmt: skip
    return [
        f"**Calibration** (`persona calibrate`, judge-free proxies — trait: {proxies['trait']}; coherence: "
        f"{proxies['coherence']}): per layer the dose where coherence falls to {target:g}. Recommended: layer "
        f"**{best['layer']}**, dose **{best['dose']:.3g}** (coef {best['coef']:.3g}), trait {best['trait_score']:.3f} "
        f"at coherence {best['coherence']:.1f} (unsteered trait {best['trait_score_unsteered']:.3f}); the steered "
        f"generations and the judged sweep use it. Numbers: {link(calibration['csv'], run)}, every probe: "
        f"{link(calibration['probes_csv'], run)}.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        f"![calibration]({relative(calibration['png'], run)})",
        "",
    ]


def missed_section(results: dict) -> list[str]:
    missed = results.get("missed") or {}
    if not missed:
        return []
    return [
        "## Missed",
        "",
        "These phases gave no result; every other phase ran. `persona study` exits with status 4 when any did.",
        "",
        *[f"- `{name}`: {reason}" for name, reason in missed.items()],
        "",
    ]


def judged_sweep_section(judged: dict, trait: str, results: dict, run: Path) -> list[str]:
    judge = results.get("config", {}).get("judge", {}).get("model", "the judge")
    columns = [
        c for c in ("coef", f"{trait}_mean", f"{trait}_sem", "coherence_mean", "n") if c in judged["table"][0]
    ]
    return [
        f"**Judged steering sweep** at layer {judged['layer']} (`response` positions), judged by `{judge}`: "
        f"trait and coherence scores (0-100) of steered answers to the eval questions. Numbers: {link(judged['csv'], run)}.",
        "",
        markdown_table(pd.DataFrame(judged["table"])[columns]),
        "",
        f"![judged sweep]({relative(judged['png'], run)})",
        "",
    ]


def generated_section(generated: dict, trait: str, run: Path) -> list[str]:
    judge = generated.get("judge", "local")
    caveat = (
        " The embedded model judging itself (`min_mass 0`: its expected number given a numeric answer) is weak:"
        " read these scores as a demonstration of the pipeline, not as measurements."
        if judge == "local"
        else ""
    )
    return [
        f"### {trait}: the paper's route — persona-prompted answers judged by `{judge}`",
        "",
        f"{generated['rows_per_side']} answers per side (system prompt with the trait's positive or negative "
        f"instruction), each judged for the trait and for coherence.{caveat}",
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
        f"Filter used for extraction: {generated['filter']}."
        + (
            " Cosine similarity of the resulting response-average vector with the pairs vector at the "
            f"recommended layer: **{generated['cosine_with_pairs_vector']:.3f}**."
            if "cosine_with_pairs_vector" in generated
            else ""
        )
        + f" CSVs: {link(generated['pos_csv'], run)}, {link(generated['neg_csv'], run)}.",
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
    r_met = reached(r == r and r >= TARGET_R)
    auc = study.get("screen_auc")
    auc_text = "not computed" if auc is None else f"{auc:.3f}"
    auc_reached = reached(auc is not None and auc >= TARGET_AUC)
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
        "(`mix_<share>`; `+steer` = preventative steering, `+caft` = concept ablation, `+cap` = projection "
        "capping at the trait-free examples' 99th percentile, each on the all-trait "
        "mixture and left out of the correlation). The activation "
        "monitor measured the projection on the persona vector before training (epoch 0) and after each epoch; "
        f"TensorBoard logs: `{relative(study['tensorboard'], run)}` (`tensorboard --logdir` it). "
        f"Numbers: {link(study['monitor_csv'], run)}.",
        "",
        f"![monitor]({relative(study['monitor_png'], run)})",
        "",
        f"**Finetuning shift vs trait score.** Pearson r over the mixture runs (n = {correlation['n']}): "
        f"**{r_text}** (target ≥ {TARGET_R}: {r_met}). Numbers: {link(study['shift_csv'], run)}.",
        "",
        markdown_table(shift[columns]),
        "",
        f"![shift]({relative(study['shift_png'], run)})",
        "",
        *arms_section(shift),
        f"**ΔP screening** of `mix_0.5` before any training (trait-eliciting vs normal samples): AUC "
        f"**{auc_text}** (target ≥ {TARGET_AUC}: {auc_reached}). Files: `{relative(study['screen_summary'], run)}/`.",
        "",
        *representation_section(study.get("representation"), run),
    ]


ARMS = ("mix_1", "mix_1+steer", "mix_1+caft", "mix_1+cap")


def arms_section(shift: pd.DataFrame) -> list[str]:
    """The all-trait mixture trained plainly and under each intervention, side by side (the rows present)."""
    rows = shift[shift["run"].isin(ARMS)]
    if len(rows) < 2:
        return []
    columns = ["run", "shift_prompt_last", "shift_response_avg", "trait_score_change"]
    columns += [column for column in ("train_loss", "val_loss") if column in rows]  # older runs lack them
    return [
        "**Interventions on the all-trait mixture.** Plain fine-tuning against preventative steering, CAFT and "
        "capping: how far each moved the projection and the trait score (their curves are in the monitor figure), "
        "and what each cost: the last epoch's training loss and the loss on the same mixture built from the "
        "held-out pairs.",
        "",
        markdown_table(rows[columns]),
        "",
    ]


def representation_section(representation: dict | None, run: Path) -> list[str]:
    if not representation:
        return []
    return [
        "**Representation shift.** The trait re-extracted on each fine-tuned model (train pairs) and read on the "
        "held-out pairs, against the base model: the mean cosine of the two vectors over layers, the recommended "
        "layer before and after, AUC at the base's recommended layer in both models, and the fine-tuned model's "
        f"AUC and separation ranges over layers with the number of layers at AUC ≥ 0.9. Numbers: {link(representation['csv'], run)}.",
        "",
        markdown_table(pd.DataFrame(representation["table"])),
        "",
        f"![representation shift]({relative(representation['png'], run)})",
        "",
    ]


def write_report(run: Path) -> Path:
    results = read_results(run)
    info, trait = results["model"], results["trait"]
    lines = [
        f"# {results.get('title', 'persona study')} report",
        "",
        f"Model: `{info['model']}` ({info['layers']} layers, hidden size {info['hidden']}), on "
        f"{info.get('device', 'cpu')}. Sanity check — *What is the capital of France?* → “{info['answer']}”",
        "",
        "Vectors are response-average mean differences from the **train** split; every separation and "
        "steering number is measured on the held-out **test** split unless its section says otherwise.",
        "",
        *([f"*{results['main_trait_note']}.*", ""] if results.get("main_trait_note") else []),
        "## Summary",
        "",
        markdown_table(trait_summary(results)),
        "",
        *vector_sections(results, run),
        *overlap_section(results.get("overlap"), run),
    ]
    if results.get("generations"):
        lines += generations_section(results["generations"], trait, run)
    if results.get("finetune"):
        lines += finetune_section(results["finetune"], run)
    if results.get("export"):
        lines += export_section(results["export"], run)
    if results.get("personality_arm"):
        lines += personality_arm_section(results["personality_arm"], run)
    lines += timings_section(results)
    lines += missed_section(results)
    lines += ["## Targets", "", markdown_table(summary_table(results)), ""]
    if results.get("not_run"):
        lines += ["## Not run", "", *[f"- {item}" for item in results["not_run"]], ""]
    path = run / "report.md"
    write_text(path, "\n".join(lines))
    write_csv(run / "summary.csv", summary_table(results))
    write_csv(run / "traits.csv", trait_summary(results))
    return path


def overlap_section(overlap: dict | None, run: Path) -> list[str]:
    if not overlap:
        return []
    largest = overlap.get("largest_abs_cosine_at_chosen_layers")
    told = (
        ""
        if largest is None
        else f" At the layers chosen for the traits, the largest |cosine| is {largest:.3f}."
    )
    return [
        "## Overlap of the traits' vectors",
        "",
        "Cosine between every pair of traits' response-average vectors at each layer: steering one trait also "
        "pushes another by this much of its length (`orthogonalise` in `steer()` and in serve requests removes it)."
        + told
        + f" Table: {link(overlap['csv'], run)}.",
        "",
        f"![overlap]({relative(overlap['png'], run)})",
        "",
    ]


def generations_section(generations: dict, trait: str, run: Path) -> list[str]:
    frame = pd.read_csv(generations["csv"])
    wide = frame.pivot(index="prompt", columns="coef", values="answer").reset_index()
    wide.columns = ["prompt"] + [f"coef {c:+.3g}" for c in wide.columns[1:]]
    dose = generations.get("dose")
    strength = (
        ""
        if dose is None
        else f", coef ±{generations['coef']:.3g} = dose ±{dose:.3g} (from {generations.get('from')})"
    )
    return [
        f"## Steered generations ({trait}, layer {generations['layer']}{strength}, `response` positions, greedy)",
        "",
        markdown_table(wide),
        "",
        f"Numbers: {link(generations['csv'], run)}.",
        "",
    ]


def personality_arm_section(arm: dict, run: Path) -> list[str]:
    return [
        f"## Personality fine-tune: {arm['trait']}",
        "",
        f"LoRA on {arm['conversations']} conversations of high-{arm['trait']} answers (TRAIT items, train split); "
        "the trait's vector extracted in the base and in the fine-tuned model (train items) and measured on the "
        "held-out items: over the layers that encode it (AUC ≥ 0.9), the AUC range, the normalised-separation range "
        f"and the layers — as the second seed's tables. Numbers: {link(arm['csv'], run)}, per layer "
        f"{link(arm['shift_csv'], run)}.",
        "",
        markdown_table(pd.DataFrame(arm["quality"])),
        "",
        f"![personality fine-tune]({relative(arm['png'], run)})",
        "",
    ]


def export_section(export: dict, run: Path) -> list[str]:
    gguf = relative(export["gguf"], run)
    return [
        "## Export",
        "",
        f"llama.cpp control vector of layer {export.get('layer', '?')} (our row L = llama.cpp `direction.{{L-1}}`): "
        f"`{gguf}`. Use it with `llama-cli -m MODEL.gguf --control-vector-scaled {gguf}:2` (plain completion: "
        "`llama-completion`); the scale multiplies the raw mean difference, so start near ±1–2 and look at the text.",
        "",
    ]


def timings_section(results: dict) -> list[str]:
    devices = results.get("devices", {})
    rows = [
        {"phase": name, "seconds": seconds, "device": devices.get(name, "")}
        for name, seconds in results["timings"].items()
    ]
    rate = results.get("matmul_gflops")
    note = (
        f" This machine multiplies float32 matrices at ~{rate:.0f} GFLOP/s (measured), to read the times against."
        if rate
        else ""
    )
    return [
        "## Timings",
        "",
        f"Phases reused from an earlier invocation show the time they took then.{note}",
        "",
        markdown_table(pd.DataFrame(rows), floatfmt=".1f"),
        "",
    ]


def shown(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "not measured" if value != value else f"{value:.3f}"  # NaN: pandas' None in a float column
    return "not measured" if value is None else str(value)


def trait_summary(results: dict) -> pd.DataFrame:
    """One row per trait: recommended layer, AUC and what it was measured on, steering effect (likelihood),
    judged effect."""
    rows = []
    for name, r in results["traits"].items():
        layers, sweep, judged = r.get("layers", {}), r.get("sweep", {}), r.get("judged_sweep") or {}
        rows.append(
            {
                "trait": name,
                "recommended layer": layers.get("recommended"),
                "AUC": layers.get("auc"),
                "AUC measured on": layers.get("examples", "held-out pairs") if layers else None,
                "steering effect (likelihood, max - min coef)": sweep.get("effect"),
                "monotone": sweep.get("monotone"),
                "judged effect (trait score, max - min coef)": judged.get("effect"),
                "generated-route cosine with pairs vector": (r.get("generated") or {}).get(
                    "cosine_with_pairs_vector"
                ),
            }
        )
    frame = pd.DataFrame(rows)
    for column in frame.columns[1:]:
        frame[column] = frame[column].map(shown)
    return frame


def summary_table(results: dict) -> pd.DataFrame:
    rows = [
        {
            "measure": f"{name}: AUC ({r['layers'].get('examples', 'held-out pairs')}) at layer "
            f"{r['layers']['recommended']}",
            "value": r["layers"]["auc"],
            "target": f">= {TARGET_AUC}",
        }
        for name, r in results["traits"].items()
        if r.get("layers")
    ]
    rows += [
        {"measure": f"{name}: {reason}", "value": "missed", "target": "a result"}
        for name, reason in (results.get("missed") or {}).items()
    ]
    rows += [
        {
            "measure": f"{name}: likelihood score monotone over coefficients",
            "value": r["sweep"]["monotone"],
            "target": "yes",
        }
        for name, r in results["traits"].items()
        if r.get("sweep")
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


def report(
    action: str = "write",
    run_dir: str = "runs/demo",
    runs: list[str] | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
) -> str:
    """Rewrite report.md (and summary.csv) of a study run from its results.json, or compare studies.

    `persona report --run_dir DIR` rewrites one run's report; `persona report compare --runs A,B[,C]`
    (studies of different models, or settings) puts them side by side: tables and figures in --output_dir.

    Args:
        action: write (one run's report) or compare (several runs).
        run_dir: With write: a run directory written by `persona study` or `persona demo`.
        runs: With compare: the run directories, a,b or [a,b].
        output_dir: With compare: where the comparison goes; default runs/compare.
        overwrite: With compare: replace an earlier comparison in output_dir (refused otherwise).
    """
    if action == "compare":
        from persona.study.compare import compare_studies

        return str(compare_studies(runs or [], output_dir or "runs/compare", overwrite=overwrite))
    if action != "write":
        raise PersonaError(f"persona report: unknown action {action!r}. Fix: use write or compare.")
    run = Path(run_dir)
    try:
        path = write_report(run)
    except (KeyError, TypeError, IndexError) as error:
        raise PersonaError(
            f"{run / 'results.json'}: incomplete or from another version (no {error}). "
            f"Fix: re-run the study with --run_dir {run_dir} (finished phases are reused)."
        ) from None
    print(f"Report: {path}")
    return str(path)
