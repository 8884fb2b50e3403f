"""Persona vectors as llama.cpp control vectors (GGUF), and back.

Layer mapping (checked against llama.cpp and repeng source):

- llama.cpp adds ``direction.k`` to the output of its 0-based decoder block ``k``: every model graph
  ends block ``il`` with ``cur = build_cvec(cur, il)`` (``src/models/*.cpp``), which is
  ``llama_adapter_cvec::apply_to`` adding ``tensors[il]`` (``src/llama-adapter.cpp``). The loader
  ``common_control_vector_load_one`` (``common/common.cpp``) puts ``direction.k`` at offset
  ``n_embd * (k - 1)`` and ``llama_adapter_cvec::apply`` copies offset ``n_embd * (il - 1)`` into
  ``tensors[il]`` for ``il`` in ``1 .. n_layer - 1``; ``direction.0`` is rejected ("there's never a
  tensor for layer 0") and the embeddings cannot be steered at all.
- repeng writes the same: its direction key is a 0-based block index read from
  ``hidden_states[key + 1]``.

Our row ``L`` is the output of block ``L - 1``, so row ``L`` <-> ``direction.{L - 1}``. Rows 2 ..
num_layers are expressible; row 0 (embeddings) and row 1 (block 0, which llama.cpp never steers)
are not.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from persona.core import checks
from persona.core.store import atomic_write
from persona.vectors.files import load_metadata, read_vector_file

ARCHITECTURE = "controlvector"
DIRECTION_NAME = re.compile(r"^direction\.(\d+)$")
FIRST_EXPRESSIBLE_ROW = 2


def row_to_direction_index(row: int) -> int:
    """Our row L (output of block L-1) -> llama.cpp ``direction.{L-1}``."""
    return row - 1


def direction_index_to_row(index: int) -> int:
    return index + 1


def _check_rows(vector_path: str, layers: list[int], num_layers: int) -> list[int]:
    if not layers:
        raise ValueError(
            f"{vector_path}: --layers is empty. Fix: give rows 2..{num_layers}, or omit it for all."
        )
    for row in layers:
        if row in (0, 1):
            what = "the embedding output" if row == 0 else "the output of block 0"
            raise ValueError(
                f"{vector_path}: layer {row} ({what}) cannot be written as a llama.cpp control vector: "
                "llama.cpp only adds direction.k after its block k for k >= 1 (direction.0 is rejected, "
                f"embeddings are never steered). Fix: use rows {FIRST_EXPRESSIBLE_ROW}..{num_layers}."
            )
        if not FIRST_EXPRESSIBLE_ROW <= row <= num_layers:
            raise ValueError(
                f"{vector_path}: layer {row} is out of range; the vector has rows 0..{num_layers} "
                f"({num_layers} blocks). Fix: use rows {FIRST_EXPRESSIBLE_ROW}..{num_layers}."
            )
    return sorted(set(layers))


def export_gguf(
    vector_path: str,
    output_path: str,
    layers: list[int] | None = None,
    coef: float | None = None,
    dose: float | None = None,
    allow_high_dose: bool = False,
    model: str | None = None,
    model_hint: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a persona vector as a llama.cpp control vector (``--control-vector out.gguf``).

    Row L of the vector (output of decoder block L-1) becomes tensor ``direction.{L-1}``, which llama.cpp
    adds to the output of its 0-based block L-1. Rows 0 (embeddings) and 1 (block 0) have no llama.cpp
    equivalent and are refused. The file is written atomically.

    Args:
        vector_path: Vector file ``[num_layers + 1, hidden]`` (``*_diff.pt``).
        output_path: Output ``.gguf`` path (alias --out).
        layers: Rows to export (our layer numbering, 2..num_layers); default: all of them.
        coef: Multiplier applied to every exported row (default 1 when no --dose is given).
        dose: Instead of --coef: each exported row scaled to this dose (|coef|·||v_L|| / mean ||h_L||, see the
            README's "Doses"), so every layer gets the same push relative to its own residual norm.
        allow_high_dose: Export a dose above the limit (the calibrated one at that layer, else the default).
        model: With --dose, the model to measure residual norms on when the vector's sidecar has none.
        model_hint: ``controlvector.model_hint``; default: the sidecar's ``model`` field, else the file stem.
        overwrite: Replace ``output_path`` if it exists.

    Returns:
        The path written.
    """
    checks.input_file(vector_path, "--vector_path", what="vector file")
    checks.output_file(
        output_path, "--output_path", inputs={"--vector_path": vector_path}, overwrite=overwrite
    )
    if coef is not None:
        checks.finite(coef, "--coef")
    import gguf

    vector = read_vector_file(vector_path)
    num_layers = vector.shape[0] - 1
    if num_layers < FIRST_EXPRESSIBLE_ROW:
        raise ValueError(
            f"{vector_path}: {num_layers} block(s); llama.cpp can only steer blocks 1.. so there is nothing "
            "to export. Fix: use a vector from a model with at least 2 blocks."
        )
    rows = _check_rows(
        vector_path,
        list(range(FIRST_EXPRESSIBLE_ROW, num_layers + 1)) if layers is None else layers,
        num_layers,
    )
    scales = row_scales(vector_path, vector, rows, coef=coef, dose=dose, force=allow_high_dose, model=model)
    scaled = vector[rows] * np.asarray(scales, dtype=vector.dtype)[:, None]
    if not np.isfinite(scaled).all():
        raise ValueError(
            f"{vector_path}: non-finite values in the exported rows (coef={coef}, dose={dose}). Fix: check the "
            "vector."
        )
    if model_hint is None:
        model_hint = str(load_metadata(vector_path).get("model") or Path(vector_path).stem)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(rows))
        for row, direction in zip(rows, scaled, strict=True):
            writer.add_tensor(f"direction.{row_to_direction_index(row)}", direction.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(Path(output_path), write)
    norms = ", ".join(f"{row}: {np.linalg.norm(scaled[i]):.1f}" for i, row in enumerate(rows[:8]))
    print(
        f"{output_path}: llama.cpp control vector, {len(rows)} layer(s) (row: norm {norms}{', ...' if len(rows) > 8 else ''}). "
        f"Use: llama-cli -m MODEL.gguf --control-vector-scaled {output_path}:SCALE"
    )
    return str(output_path)


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else str(field.contents())


def import_gguf(path: str, num_layers: int | None = None):
    """Read a llama.cpp control vector back as ``[num_layers + 1, hidden]`` float32.

    ``direction.k`` lands in row k+1; rows absent from the file (always 0 and 1) are zeros. Several
    tensors for one layer are summed, as llama.cpp does.

    Args:
        path: A ``.gguf`` file with architecture ``controlvector``.
        num_layers: Number of decoder blocks of the target model; default: highest direction index + 1.
    """
    import gguf
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"Control vector {path} does not exist. Fix: check the path.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:
        raise ValueError(f"{path}: not a readable GGUF file ({error}).") from error
    architecture = _string_field(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise ValueError(
            f"{path}: general.architecture is {architecture!r}, not {ARCHITECTURE!r}; this is not a control vector "
            "(a model file?). Fix: pass a file written by `persona export-gguf` or llama.cpp's cvector-generator."
        )
    directions: list[tuple[int, np.ndarray]] = []
    for tensor in reader.tensors:
        match = DIRECTION_NAME.match(tensor.name)
        if match is None:
            raise ValueError(f"{path}: tensor {tensor.name!r} is not named direction.<layer>.")
        index = int(match.group(1))
        if index == 0:
            raise ValueError(f"{path}: tensor direction.0 is invalid (llama.cpp never steers block 0).")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ValueError(
                f"{path}: tensor {tensor.name} is {tensor.tensor_type.name} with shape {list(tensor.shape)}; "
                "control vectors hold 1-D F32 tensors."
            )
        directions.append((index, np.array(tensor.data, dtype=np.float32)))  # copy out of the memmap
    if not directions:
        raise ValueError(f"{path}: no direction tensors.")
    hidden_sizes = {data.shape[0] for _, data in directions}
    if len(hidden_sizes) != 1:
        raise ValueError(f"{path}: direction tensors disagree on the hidden size: {sorted(hidden_sizes)}.")
    highest = max(index for index, _ in directions)
    if num_layers is None:
        num_layers = highest + 1
    elif highest + 1 > num_layers:
        raise ValueError(
            f"{path}: direction.{highest} needs a model with at least {highest + 1} blocks, got num_layers={num_layers}."
        )
    vector = torch.zeros(num_layers + 1, hidden_sizes.pop(), dtype=torch.float32)
    for index, data in directions:
        vector[direction_index_to_row(index)] += torch.from_numpy(data)
    return vector


def row_scales(
    vector_path, vector, rows: list[int], *, coef, dose, force: bool, model: str | None
) -> list[float]:
    """The multiplier of each exported row: ``coef`` for all (default 1), or each row's coefficient of ``dose``."""
    from persona.vectors.dose import layer_norms, one_of, resolve

    one_of(coef, dose, coef_flag="--coef", dose_flag="--dose")
    if dose is None:
        return [1.0 if coef is None else float(coef)] * len(rows)
    norms = layer_norms(vector_path, model=model)
    return [
        resolve(vector_path, vector[row], row, norms, dose=dose, force=force)[
            0
        ]  # each row checked by the guard
        for row in rows
    ]
