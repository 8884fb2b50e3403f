"""Persona vectors: from activations to files. Masked per-example means (``activations``), the extraction predict
loop (``extraction``), projections of examples on a vector (``projection``), residual norms (``norms``), doses
(``dose``), capping ranges from the negative examples and the neutral texts (``ranges``, ``neutral_ranges``; the
neutral texts and their cache: ``neutral``), the ``.pt`` + sidecar files and the torch-free reader (``files``, ``reader``) and GGUF export (``gguf``).

May import: ``core``, ``models``, ``hooks``, ``data``. This package only re-exports the file API (no torch,
Lightning or transformers import), so commands check vector files in well under a second.
"""

from persona.core.constants import VECTOR_KINDS
from persona.core.store import sidecar_path
from persona.vectors.files import (
    LAYER_CONVENTION,
    default_save_dir,
    layers_dir,
    load_metadata,
    load_vector,
    read_vector_file,
    save_vector,
    vector_filename,
    vector_for_model,
    vectors_to_read,
)

__all__ = [
    "LAYER_CONVENTION",
    "VECTOR_KINDS",
    "default_save_dir",
    "layers_dir",
    "load_metadata",
    "load_vector",
    "read_vector_file",
    "save_vector",
    "sidecar_path",
    "vector_filename",
    "vector_for_model",
    "vectors_to_read",
]
