"""`persona demo`: the whole method on the embedded model, offline, ending in a report.

Phases, each cached by its inputs in the run directory so a re-run resumes where it stopped:
vectors from contrastive pairs (seed trait + personality trait) → per-layer held-out separation →
judge-free steering sweep → persona-prompted generation judged by the local judge → steered
generations → fine-tuning study (mixtures, preventative steering, CAFT, monitor, finetuning shift,
ΔP screening) → llama.cpp export → report.md.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from persona.data.build import default_pairs_path
from persona.demo.report import summary_table, write_report
from persona.report import PhaseRunner
from persona.store import write_json


def demo(
    trait: str = "evil",
    personality_trait: str = "psychopathy",
    model: str = "smollm2-135m",
    run_dir: str = "runs/demo",
    quick: bool = False,
    coefs: list[float] | None = None,
    max_new_tokens: int = 48,
    finetune_samples: int = 24,
    finetune_epochs: int = 2,
) -> str:
    """Run the method end to end on the embedded model (offline) and write report.md with figures and CSVs.

    Args:
        trait: Seed trait with hand-written contrastive pairs (datasets/pairs/<trait>.jsonl) and trait artifacts.
        personality_trait: A Big Five / Dark Triad trait with TRAIT-format items (datasets/personality/).
        model: Model alias, hub id or local path.
        run_dir: Run directory; re-running continues it, reusing finished phases.
        quick: Smoke run (about 2 minutes): one trait, three coefficients, no judged generation, three short LoRA runs.
        coefs: Steering coefficient grid for the likelihood sweep (default -2,-1,0,1,2).
        max_new_tokens: Length of generated answers.
        finetune_samples: Conversations per fine-tuning mixture.
        finetune_epochs: Epochs per LoRA run.
    """
    from persona.demo import finetune, phases
    from persona.models import load_model_and_tokenizer
    from persona.steering import generate_steered

    start = time.perf_counter()
    run = Path(run_dir)
    traits = [trait] if quick else [trait, personality_trait]
    sources = {name: default_pairs_path(name) for name in traits}  # bad names fail before any model loads
    coefs = coefs or ([-2.0, 0.0, 2.0] if quick else [-2.0, -1.0, 0.0, 1.0, 2.0])
    if quick:
        max_new_tokens, finetune_samples, finetune_epochs = min(max_new_tokens, 24), 8, 1
    runner = PhaseRunner(run, total=2 + 3 * len(traits) + (0 if quick else 1) + 2)
    loaded: dict = {}

    def lm_and_tokenizer():
        if not loaded:
            loaded["pair"] = load_model_and_tokenizer(model)
        return loaded["pair"]

    def hello(phase_dir: Path) -> dict:
        lm, tokenizer = lm_and_tokenizer()
        question = [[{"role": "user", "content": "What is the capital of France?"}]]
        answer = generate_steered(lm, tokenizer, question, max_new_tokens=16, temperature=0)[0]
        return {
            "model": model,
            "layers": lm.config.num_hidden_layers,
            "hidden": lm.config.hidden_size,
            "answer": answer.strip(),
        }

    results: dict = {"trait": trait, "model": runner.run("model", {"model": model}, hello), "traits": {}}
    for name in traits:
        source = sources[name]
        stamp = {"model": model, "source": str(source), "mtime": source.stat().st_mtime}
        vectors = runner.run(
            f"extract_{name}",
            stamp,
            lambda d, n=name, s=source: phases.extract_phase(d, model=model, trait=n, source=s),
        )["vectors"]
        layer_info = runner.run(
            f"layers_{name}",
            {**stamp, "vectors": vectors},
            lambda d, v=vectors, s=source: phases.layers_phase(
                d, model=model, vector_path=v["response_avg"], source=s
            ),
        )
        layer = layer_info["recommended"]
        sweep = runner.run(
            f"sweep_{name}",
            {**stamp, "layer": layer, "coefs": coefs},
            lambda d, n=name, v=vectors, s=source, lay=layer: phases.sweep_phase(
                d,
                *lm_and_tokenizer(),
                trait=n,
                vector_path=v["response_avg"],
                source=s,
                layer=lay,
                coefs=coefs,
            ),
        )
        results["traits"][name] = {"vectors": vectors, "layers": layer_info, "sweep": sweep}

    main = results["traits"][trait]
    vector_path, layer = main["vectors"]["response_avg"], main["layers"]["recommended"]
    if not quick:
        results["generated"] = runner.run(
            "generated",
            {"model": model, "trait": trait, "layer": layer, "tokens": max_new_tokens},
            lambda d: phases.generated_phase(
                d,
                model=model,
                trait=trait,
                pairs_vector=vector_path,
                layer=layer,
                questions=2,
                max_tokens=max_new_tokens,
            ),
        )
    results["generations"] = runner.run(
        "generations",
        {"vectors": vector_path, "layer": layer, "coefs": coefs, "tokens": max_new_tokens},
        lambda d: phases.generations_phase(
            d,
            *lm_and_tokenizer(),
            vector_path=vector_path,
            layer=layer,
            coef=max(coefs),
            max_new_tokens=max_new_tokens,
        ),
    )
    results["finetune"] = runner.run(
        "finetune",
        {
            "model": model,
            "trait": trait,
            "vectors": vector_path,
            "layer": layer,
            "quick": quick,
            "samples": finetune_samples,
            "epochs": finetune_epochs,
        },
        lambda d: finetune.finetune_study(
            d,
            model=model,
            trait=trait,
            vector_path=vector_path,
            layer=layer,
            samples=finetune_samples,
            epochs=finetune_epochs,
            screen_tokens=min(max_new_tokens, 32),
            quick=quick,
        ),
    )
    results["export"] = runner.run(
        "export_gguf",
        {"vectors": vector_path},
        lambda d: phases.export_phase(d, trait=trait, vector_path=vector_path),
    )
    results["timings"] = {**runner.timings, "total (this invocation)": time.perf_counter() - start}
    # ru_maxrss is in KiB on Linux: the peak of this process, i.e. of the whole demo when run in one go.
    results["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["not_run"] = (
        ["judged generation (skipped by --quick)", f"personality trait {personality_trait}"] if quick else []
    )
    write_json(run / "results.json", results)
    report_path = write_report(run)
    print("\nSummary")
    for row in summary_table(results).itertuples(index=False):
        print(f"  {row.measure}: {row.value} (target {row.target})")
    print(f"Report: {report_path}")
    return str(report_path)
