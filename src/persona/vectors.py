"""Persona vector files: ``[num_layers + 1, hidden]`` float32 tensors plus a JSON sidecar.

Row 0 is the embedding output; row L is the raw output of decoder block L-1 (HF ``hidden_states[L]``
for L < num_layers; the last row is taken *before* the final norm). Files are named
``<trait>_{prompt_avg,response_avg,prompt_last}_diff.pt`` as in the seed research code and load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from persona import __version__
from persona.store import atomic_write

VECTOR_KINDS = ("prompt_avg", "response_avg", "prompt_last")
LAYER_CONVENTION = (
    "row 0 = embedding output; row L = output of decoder block L-1 (HF hidden_states[L]); "
    "the last row is the last block's raw output, before the final norm"
)


def vector_filename(trait: str, kind: str) -> str:
    if kind not in VECTOR_KINDS:
        raise ValueError(f"kind={kind!r} is not a vector kind. Fix: use one of {', '.join(VECTOR_KINDS)}.")
    return f"{trait}_{kind}_diff.pt"


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_vector(vector: torch.Tensor, path: str | Path, metadata: dict | None = None) -> Path:
    """Save a vector tensor and its JSON sidecar atomically."""
    path = Path(path)
    tensor = vector.detach().to("cpu", torch.float32).contiguous()
    atomic_write(path, lambda tmp: torch.save(tensor, tmp))
    meta = {
        "layer_convention": LAYER_CONVENTION,
        "shape": list(tensor.shape),
        "persona_version": __version__,
        **(metadata or {}),
    }
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def load_vector(
    path: str | Path, *, hidden_size: int | None = None, num_layers: int | None = None
) -> torch.Tensor:
    """Load a vector file safely (never unpickles objects) and check it against a model's shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Vector file {path} does not exist. Fix: run `persona extract` or check the path."
        )
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled objects; say which file
        raise ValueError(
            f"{path}: not a plain tensor file loadable with weights_only=True ({error})."
        ) from error
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor [num_layers+1, hidden], found {type(tensor).__name__}.")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise ValueError(f"{path}: expected shape [num_layers+1, hidden], found {list(tensor.shape)}.")
    if hidden_size is not None and tensor.shape[-1] != hidden_size:
        raise ValueError(
            f"{path}: hidden size {tensor.shape[-1]} does not match the model's {hidden_size}. "
            "Fix: use a vector extracted from this model."
        )
    if num_layers is not None and tensor.shape[0] != num_layers + 1:
        raise ValueError(
            f"{path}: {tensor.shape[0]} rows, but the model has {num_layers} blocks (expected {num_layers + 1} rows: "
            "embeddings + one per block). Fix: use a vector extracted from this model."
        )
    return tensor.to(torch.float32)


def load_metadata(path: str | Path) -> dict:
    side = sidecar_path(path)
    return json.loads(side.read_text()) if side.is_file() else {}
