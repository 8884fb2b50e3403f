"""Persona vector files: ``[num_layers + 1, hidden]`` float32 tensors plus a JSON sidecar.

Row 0 is the embedding output; row L is the raw output of decoder block L-1 (HF ``hidden_states[L]``
for L < num_layers; the last row is taken *before* the final norm). Files are named
``<trait>_{prompt_avg,response_avg,prompt_last}_diff.pt`` as in the seed research code and load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from persona import __version__
from persona.core.checks import input_file, layers_in_range
from persona.core.constants import VECTOR_KINDS  # noqa: F401  (re-exported: the file kinds)
from persona.core.errors import PersonaError
from persona.core.store import atomic_write, checkout_root, sidecar_path, write_json

LAYER_CONVENTION = (
    "row 0 = embedding output; row L = output of decoder block L-1 (HF hidden_states[L]); "
    "the last row is the last block's raw output, before the final norm"
)


def vector_filename(trait: str, kind: str) -> str:
    if kind not in VECTOR_KINDS:
        raise ValueError(f"kind={kind!r} is not a vector kind. Fix: use one of {', '.join(VECTOR_KINDS)}.")
    return f"{trait}_{kind}_diff.pt"


def default_save_dir(model: str) -> Path:
    """Where ``persona extract`` writes a model's vectors by default: ``persona_vectors/<model-short-name>``."""
    from persona.models import model_short_name

    return Path("persona_vectors") / model_short_name(model)


def vectors_to_read(model: str) -> Path:
    """A model's vectors to read by default: ``./persona_vectors/<model>`` when you extracted some there, else the
    ones this checkout ships (``persona_vectors/`` beside ``src/``, found from any directory, as the datasets are).
    A LoRA adapter without vectors of its own (``persona_vectors/<base>+<run>``) reads its base model's."""
    from persona.models import is_adapter

    local = default_save_dir(model)
    if is_adapter(model) and not local.is_dir():  # a fine-tuned model without vectors of its own: its base's
        from persona.models import adapter_base

        return vectors_to_read(adapter_base(model))
    shipped = checkout_root() / local
    return local if local.is_dir() or not shipped.is_dir() else shipped


def layers_dir(vector_path: str | Path) -> Path:
    """Where ``persona layers`` writes a vector's per-layer metrics by default (the server reads it back)."""
    vector_path = Path(vector_path)
    return vector_path.parent / f"{vector_path.stem}_layers"


def save_vector(vector, path: str | Path, metadata: dict | None = None) -> Path:
    """Save a vector tensor and its JSON sidecar atomically (a non-finite vector is refused)."""
    import torch

    path = Path(path)
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{path}: refusing to save a vector with NaN or infinite values (see the inputs).")
    tensor = vector.detach().to("cpu", torch.float32).contiguous()
    atomic_write(path, lambda tmp: torch.save(tensor, tmp))
    meta = {
        "layer_convention": LAYER_CONVENTION,
        "shape": list(tensor.shape),
        "persona_version": __version__,
        **(metadata or {}),
    }
    write_json(sidecar_path(path), meta)
    return path


def read_vector_file(path: str | Path, *, hidden_size: int | None = None, num_layers: int | None = None):
    """A vector file as a float32 numpy array ``[rows, hidden]``, checked, without importing torch.

    Refuses (naming the file and the fix): a missing, empty, truncated or pickled file; a shape that is
    not ``[num_layers + 1, hidden]`` for the model; any NaN or infinite element (naming the rows).
    """
    import numpy as np

    from persona.vectors.reader import NotATensorFile, read_tensor_array

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Vector file {path} does not exist. Fix: run `persona extract` or check the path."
        )
    try:
        array = read_tensor_array(path)
    except NotATensorFile as error:
        raise ValueError(
            f"{path}: not a vector file: {error}. Fix: point at a .pt file written by `persona extract` "
            "(a plain tensor [num_layers+1, hidden])."
        ) from None
    if array is None:  # a format only torch reads (legacy pickle): still weights_only
        array = _torch_load_array(path)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"{path}: expected shape [num_layers+1, hidden], found {list(array.shape)}.")
    if hidden_size is not None and array.shape[-1] != hidden_size:
        raise ValueError(
            f"{path}: hidden size {array.shape[-1]} does not match the model's {hidden_size}. "
            "Fix: use a vector extracted from this model."
        )
    if num_layers is not None and array.shape[0] != num_layers + 1:
        raise ValueError(
            f"{path}: {array.shape[0]} rows, but the model has {num_layers} blocks (expected {num_layers + 1} rows: "
            "embeddings + one per block). Fix: use a vector extracted from this model."
        )
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=-1))
    if bad_rows.size:
        raise ValueError(
            f"{path}: row(s) {', '.join(map(str, bad_rows[:10].tolist()))} hold NaN or infinite values. "
            "Fix: re-extract the vector (check the inputs it was made from) or use another file."
        )
    return array


def _torch_load_array(path: Path):
    import torch

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled objects; say which file
        raise ValueError(
            f"{path}: not a plain tensor file (torch could not read it with weights_only=True). Fix: point at a "
            "vector .pt file written by `persona extract`."
        ) from error
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor [num_layers+1, hidden], found {type(tensor).__name__}.")
    return tensor.detach().to(torch.float32).numpy()


def load_vector(path: str | Path, *, hidden_size: int | None = None, num_layers: int | None = None):
    """A checked vector file (see :func:`read_vector_file`) as a float32 torch tensor ``[rows, hidden]``."""
    import torch

    return torch.from_numpy(read_vector_file(path, hidden_size=hidden_size, num_layers=num_layers).copy())


def load_metadata(path: str | Path) -> dict:
    """The JSON sidecar of a vector file ({} when there is none)."""
    from persona.core.store import read_json

    side = sidecar_path(path)
    return read_json(side, what="vector sidecar") if side.is_file() else {}


def vector_for_model(
    model: str, vector_path: str | Path, *, layers: Iterable[int] = (), trust_remote_code: bool = False
):
    """A vector file checked against the model's config (no weights loaded): ``[num_layers + 1, hidden]``.

    ``layers`` must be in range and hold a direction (a row of zeros has none).
    """
    from persona.models import model_dimensions

    input_file(vector_path, "--vector_path", what="vector file")
    hidden_size, num_layers = model_dimensions(model, trust_remote_code=trust_remote_code)
    layers = layers_in_range(layers, num_layers, "--layer", model)
    vector = read_vector_file(vector_path, hidden_size=hidden_size, num_layers=num_layers)
    for layer in layers:
        if not vector[layer].any():
            raise PersonaError(
                f"{vector_path}: row {layer} is all zeros (no direction). Fix: choose another --layer."
            )
    return vector
