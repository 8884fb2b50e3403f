"""Flags that several commands share, defined once: their names (the seed's), types, defaults and help.

A command takes a group as one parameter (``hardware: Hardware = Hardware()``); ``persona <command>`` shows its
fields as top-level flags (``--dtype``, ``--devices``, not ``--hardware.dtype``), so configs and the seed's
spellings stay as they were, and ``-c``/``--print_config`` read and write them flat. In Python:
``extract(..., hardware=Hardware(accelerator="cpu"))``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from persona.core import checks
from persona.core.hardware import check_dtype


@dataclass(frozen=True)
class Hardware:
    """Where and how the model runs (the commands that run a Lightning loop)."""

    dtype: str = "float32"
    """Model dtype: float32, bfloat16, float16 or auto."""
    accelerator: str = "auto"
    """Lightning accelerator (cpu, gpu, auto)."""
    devices: int = 1
    """Devices (processes) to use; with strategy ddp the work is sharded and results reduced across ranks."""
    strategy: str = "auto"
    """Lightning strategy (auto, ddp, ddp_spawn)."""
    trust_remote_code: bool = False
    """Allow custom model code from the hub."""

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        checks.at_least(self.devices, 1, "--devices")

    @property
    def trainer(self) -> dict:
        """The Lightning Trainer's share: accelerator, devices, strategy."""
        return {"accelerator": self.accelerator, "devices": self.devices, "strategy": self.strategy}


@dataclass(frozen=True)
class Batching:
    """How examples are batched, cut and placed (the commands that read examples through the model)."""

    max_batch_tokens: int | None = None
    """Batch by padded tokens (rows x longest row) instead of --batch_size rows: as many examples per forward as
    fit, e.g. 16384 on a GPU (an example longer than that runs alone)."""
    max_length: int | None = None
    """Cut prompt+response to this many tokens; default the model's context (a warning counts cut rows)."""
    device_map: str | None = None
    """Split one model over this process's GPUs with accelerate (auto) when it is larger than one GPU; with
    --devices 1."""

    def __post_init__(self) -> None:
        if self.max_batch_tokens is not None:
            checks.at_least(self.max_batch_tokens, 1, "--max_batch_tokens")
        if self.max_length is not None:
            checks.at_least(self.max_length, 2, "--max_length")


GROUPS = (Hardware, Batching)


def groups_of(function) -> dict[str, type]:
    """The function's parameters whose type is a shared flag group: ``{"hardware": Hardware, ...}``."""
    hints = typing.get_type_hints(function)
    return {name: hint for name, hint in hints.items() if hint in GROUPS}


def flat_to_groups(function, values: dict) -> dict:
    """Keyword arguments for ``function`` from flat flag values: each group's fields gathered into its object."""
    values = dict(values)
    for name, group in groups_of(function).items():
        values[name] = group(**{field.name: values.pop(field.name) for field in dataclasses.fields(group)})
    return values
