"""Checks every command runs on its inputs and outputs before torch, Lightning or a model loads.

Import-light (standard library only), so a bad path, a clash of outputs or a missing model is answered
in well under two seconds. Each failure is a :class:`persona.core.errors.PersonaError` whose message names
the flag, the file and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from persona.core.errors import PersonaError


def input_file(path: str | Path | None, flag: str, *, what: str = "file") -> Path | None:
    """``path`` exists and is a readable regular file (None passes: the flag was not given)."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise PersonaError(f"{flag} {path}: no such {what}. Fix: check the path.")
    if not path.is_file():
        raise PersonaError(
            f"{flag} {path}: is a directory, not a {what}. Fix: point at the {what} inside it."
        )
    if not os.access(path, os.R_OK):
        raise PersonaError(f"{flag} {path}: not readable. Fix: check its permissions.")
    return path


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor is a writable directory (a regular file in the way is refused)."""
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise PersonaError(
                    f"{flag} {path}: {parent} is a file, so nothing can be written under it. Fix: choose another path."
                )
            if not os.access(parent, os.W_OK):
                raise PersonaError(f"{flag} {path}: {parent} is not writable. Fix: choose another path.")
            return


def _input_files(inputs: Mapping[str, str | Path | None]) -> Iterable[tuple[str, Path]]:
    """Each input as (what to call it, path); a vector file's sidecar is an input of every command that reads it."""
    from persona.core.store import sidecar_path

    for flag, path in inputs.items():
        if path is None:
            continue
        yield flag, Path(path)
        if Path(path).suffix == ".pt":
            yield f"the sidecar of {flag} {path}", sidecar_path(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def output_file(
    path: str | Path,
    flag: str,
    *,
    inputs: Mapping[str, str | Path | None] = {},
    overwrite: bool = False,
    exists_ok: bool = False,
) -> Path:
    """A file the command will write: not one of its inputs, not an existing file unless ``--overwrite``.

    ``exists_ok``: the command itself resumes or updates this file (it checks ownership on its own).
    """
    path = Path(path)
    for input_flag, input_path in _input_files(inputs):
        if _same_file(path, input_path):
            raise PersonaError(
                f"{flag} {path} is also {input_flag}: writing it would destroy the input. Fix: choose another {flag}."
            )
    if path.is_dir():
        raise PersonaError(f"{flag} {path}: is a directory. Fix: give a file path.")
    if path.exists() and not (overwrite or exists_ok):
        raise PersonaError(
            f"{flag} {path} exists. Fix: pass --overwrite to replace it, or choose another path."
        )
    _writable_parent(path, flag)
    return path


def output_dir(
    path: str | Path,
    flag: str,
    *,
    produces: Iterable[str] = (),
    overwrite: bool = False,
    inputs: Mapping[str, str | Path | None] = {},
) -> Path:
    """A directory the command writes ``produces`` into: creatable, and none of them there unless ``--overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PersonaError(f"{flag} {path}: is a file, not a directory. Fix: choose another {flag}.")
    _writable_parent(path / "x", flag)
    for name in produces:
        target = path / name
        for input_flag, input_path in _input_files(inputs):
            if _same_file(target, input_path):
                raise PersonaError(
                    f"{flag} {path}: it would overwrite {input_flag} {input_path}. Fix: choose another {flag}."
                )
        if target.exists() and not overwrite:
            raise PersonaError(
                f"{flag} {path}: {name} exists there. Fix: pass --overwrite to replace it, or choose another {flag}."
            )
    return path


def at_least(value: float, minimum: float, flag: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise PersonaError(
            f"{flag} {value!r}: must be a number >= {minimum}. Fix: pass e.g. {flag} {max(minimum, 1)}."
        )
    return value


def device_map_alone(device_map: str | None, devices: int, strategy: str) -> None:
    """``--device_map`` splits one model over one process's GPUs: not with several data-parallel processes."""
    if device_map is not None and (devices != 1 or strategy not in ("auto", "single_device")):
        raise PersonaError(
            f"--device_map {device_map} splits one model over this process's GPUs; it does not combine with "
            f"--devices {devices} --strategy {strategy}. Fix: pass --devices 1, or drop --device_map to run one "
            "whole model per device."
        )


def run_settings(*, batch_size: int, dtype: str) -> None:
    """The batch size and precision flags of the commands that run a model outside a flag group."""
    from persona.core.hardware import check_dtype

    at_least(batch_size, 1, "--batch_size")
    check_dtype(dtype)


def finite(value: float, flag: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PersonaError(f"{flag} {value!r}: must be a finite number. Fix: pass e.g. {flag} 1.5.")
    return value


def layers_in_range(layers: Iterable[int], num_layers: int, flag: str, model: str) -> list[int]:
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers:
            raise PersonaError(
                f"{flag} {layer!r} is out of range for {model} with {num_layers} blocks. "
                f"Fix: choose 0..{num_layers} (0 = embeddings, L = output of block L-1)."
            )
        out.append(layer)
    return out


def not_both(flags: Mapping[str, object], other: Mapping[str, object]) -> None:
    """Refuse a command line that gives two alternative inputs (e.g. CSVs and pairs) at once."""
    given = [flag for flag, value in flags.items() if value is not None]
    given_other = [flag for flag, value in other.items() if value is not None]
    if given and given_other:
        raise PersonaError(
            f"{', '.join(given)} and {', '.join(given_other)} were both given, but only one input is used. "
            f"Fix: drop {' and '.join(given_other)} or {' and '.join(given)}."
        )


def example_inputs(pos_path: str | None, neg_path: str | None, pairs_path: str | None) -> None:
    """Scored CSVs (both) or contrastive pairs, not both, and the files given exist."""
    not_both({"--pairs_path": pairs_path}, {"--pos_path": pos_path, "--neg_path": neg_path})
    if pairs_path is None and (pos_path is None or neg_path is None):
        raise PersonaError(
            "Give --pos_path and --neg_path (scored CSVs) or --pairs_path (contrastive pairs)."
        )
    for flag, path in (("--pos_path", pos_path), ("--neg_path", neg_path), ("--pairs_path", pairs_path)):
        input_file(path, flag)
