"""The fine-tuning study's runs: one LoRA run per data mixture, then the intervention arms on the all-trait mixture,
named so that a run's name says its trait share (``mix_0.5``, ``mix_1+caft``)."""

from __future__ import annotations


def trait_share(run: str) -> float:
    """The trait share of a run named by :func:`planned_runs`: ``mix_0.5`` -> 0.5, ``mix_1+caft`` -> 1.0."""
    return float(run.split("_")[1].split("+")[0])


def planned_runs(
    mixtures: tuple[float, ...], sizes, vector_path: str, layer: int
) -> list[tuple[float, str, list]]:
    """(trait share, run name, extra callbacks): one run per mixture, then steering, CAFT and capping (the
    projection on the vector clamped at the 99th percentile of the trait-free examples) on the all-trait one."""
    from persona.training.callbacks import ConceptAblation, PreventativeSteering, ProjectionCapping

    plan = [(share, f"mix_{share:g}", []) for share in mixtures]
    if sizes.finetune_interventions and 1.0 in mixtures:
        plan.append(
            (
                1.0,
                "mix_1+steer",
                [
                    PreventativeSteering(
                        vector_path,
                        [layer],
                        coef=sizes.steering_coef,
                        dose=sizes.steering_dose,
                        allow_high_dose=True,
                    )
                ],
            )  # fmt: skip
        )
        plan.append((1.0, "mix_1+caft", [ConceptAblation(vector_paths=[vector_path], layers=[layer])]))
        plan.append((1.0, "mix_1+cap", [ProjectionCapping(vector_path, [layer], hi="p99")]))
    return plan
