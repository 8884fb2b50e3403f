"""Per-response monitoring: projections read while a batch generates, z-scored against a start-up baseline.

For each monitored trait, at the trait's layer and on its unit direction:
- ``prompt_last``: the projection of the last prompt token (the paper's predictor of prompt-induced shift);
- ``response_avg``: the mean projection over the reply's tokens: every generated token except an
  end-of-sequence token, as a teacher-forced pass over prompt + reply would read them (the engine runs
  one extra step for a monitored reply cut by ``max_tokens`` or a stop sequence, so its last token is read).
Both are read after this request's own ablation and steering at that layer: what the following blocks see.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from persona.hooks.operators import project
from persona.hooks.registry import ForwardState
from persona.serve.traits import MonitorTarget

KINDS = ("prompt_last", "response_avg")

# Everyday requests with no trait in them: the reference distribution of projections (z = 0 here).
NEUTRAL_PROMPTS = (
    "How do I boil an egg?",
    "What is the capital of France?",
    "Give me three tips for studying well.",
    "Explain photosynthesis in two sentences.",
    "What is a good name for a grey cat?",
    "How many days are there in a leap year?",
    "Suggest a healthy breakfast.",
    "What does a librarian do?",
    "Write one sentence about the sea.",
    "How do I convert Celsius to Fahrenheit?",
    "What are the colours of the rainbow?",
    "Recommend a board game for a family evening.",
    "Why is the sky blue?",
    "How should I water a cactus?",
    "What is the difference between a lake and a pond?",
    "Summarise the rules of chess in one sentence.",
)


class ProjectionRecorder:
    """Hooks that read, at each monitored layer, every row's projection on the monitored directions.

    One ``[batch, n]`` float32 record per forward and layer stays on the device (no host sync while
    generating); record 0 is the prefill (last prompt token of each row), record k the decode step
    that read generated token k-1.
    """

    def __init__(self, targets: Sequence[MonitorTarget]):
        self.columns: dict[tuple[str, int], tuple[int, int]] = {}
        directions: dict[int, list[Tensor]] = {}
        for target in targets:
            key = (target.trait, target.layer)
            if key not in self.columns:
                layer_directions = directions.setdefault(target.layer, [])
                self.columns[key] = (target.layer, len(layer_directions))
                layer_directions.append(target.direction)
        self.directions = {layer: torch.stack(found).float() for layer, found in directions.items()}
        self.records: dict[int, list[Tensor]] = {layer: [] for layer in self.directions}
        self.prefill_seen: dict[int, list[bool]] = {layer: [] for layer in self.directions}

    def hooks(self) -> list[tuple[int, object]]:
        return [(layer, self._reader(layer)) for layer in self.directions]

    def _reader(self, layer: int):
        placed: dict[torch.device, Tensor] = {}  # the directions on the layer's device, moved once

        def read(hidden: Tensor, state: ForwardState) -> None:
            if hidden.device not in placed:
                placed[hidden.device] = self.directions[layer].to(hidden.device)
            directions = placed[hidden.device]
            prefill = state.prefill
            if prefill:
                last = state.last_token_mask(hidden.shape[1], hidden.device).unsqueeze(-1)
                picked = (hidden * last.to(hidden.dtype)).sum(dim=1)  # exactly the one last token per row
            else:
                picked = hidden[:, -1]
            self.records[layer].append(project(picked.float().unsqueeze(-2), directions))
            self.prefill_seen[layer].append(prefill)

        return read

    def row_projections(
        self, row: int, target: MonitorTarget, tokens_read: int
    ) -> tuple[float, float | None]:
        """(prompt_last, response_avg or None for an empty reply) of one row, from the first records."""
        layer, column = self.columns[(target.trait, target.layer)]
        records, phases = self.records[layer], self.prefill_seen[layer]
        if not phases or not phases[0] or any(phases[1:]):
            raise RuntimeError(
                f"Monitor at layer {layer}: expected one prefill then decode steps, saw {phases}."
            )
        prompt_last = float(records[0][row, column])
        steps = records[1 : 1 + tokens_read]
        if not steps:
            return prompt_last, None
        return prompt_last, float(torch.stack([step[row, column] for step in steps]).mean())


def reply_projections(
    readings: dict[int, Tensor],
    columns: dict[tuple[str, int], int],
    target: MonitorTarget,
    prompt_len: int,
    tokens_read: int,
) -> tuple[float, float | None]:
    """(prompt_last, response_avg or None for an empty reply) from the engine's per-position read-outs.

    ``readings[layer]``: ``[positions, n]``, projections of prompt + reply tokens on the unit directions, column
    ``columns[(trait, layer)]``; the same two numbers :meth:`ProjectionRecorder.row_projections` reads.
    """
    layer, column = target.layer, columns[(target.trait, target.layer)]
    found = readings.get(layer)
    if found is None or found.shape[0] < prompt_len + tokens_read:
        have = 0 if found is None else found.shape[0]
        raise ValueError(
            f"layer {layer} was read at {have} positions, the prompt and reply need {prompt_len + tokens_read}"
        )
    prompt_last = float(found[prompt_len - 1, column])
    if not tokens_read:
        return prompt_last, None
    return prompt_last, float(found[prompt_len : prompt_len + tokens_read, column].mean())


@dataclass(frozen=True)
class Baseline:
    """Mean and standard deviation of each (trait, kind) projection over the neutral prompts' replies."""

    stats: dict[tuple[str, str], tuple[float, float, int]]  # (trait, kind) -> (mean, std, n)

    @classmethod
    def from_values(cls, values: dict[tuple[str, str], list[float]]) -> Baseline:
        stats = {}
        for key, found in values.items():
            found = [v for v in found if v is not None and math.isfinite(v)]
            if found:
                std = statistics.stdev(found) if len(found) > 1 else 0.0
                stats[key] = (statistics.fmean(found), std, len(found))
        return cls(stats)

    def z(self, trait: str, kind: str, value: float | None) -> float | None:
        mean, std, _ = self.stats.get((trait, kind), (0.0, 0.0, 0))
        if value is None or std <= 0:
            return None
        return (value - mean) / std

    def describe(self, trait: str) -> dict:
        out = {}
        for kind in KINDS:
            if (trait, kind) in self.stats:
                mean, std, n = self.stats[(trait, kind)]
                out[kind] = {"mean": round(mean, 6), "std": round(std, 6), "n": n}
        return out


def monitor_report(
    projections: Sequence[tuple[MonitorTarget, tuple[float, float | None]]],
    baseline: Baseline,
    alert_z: float,
) -> dict[str, dict]:
    """The reply's ``persona.monitor`` field: per trait, both projections with z-scores and the alert flag.

    The alert is one-sided (a move toward the trait): either z-score above ``alert_z``.
    """
    report = {}
    for target, values in projections:
        entry: dict = {"layer": target.layer}
        alert = False
        for kind, value in zip(KINDS, values, strict=True):
            z = baseline.z(target.trait, kind, value)
            entry[kind] = {"projection": value, "z": z}
            alert = alert or (z is not None and z > alert_z)
        entry["alert"] = alert
        report[target.trait] = entry
    return report
