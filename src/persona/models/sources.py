"""Checks of a model name before anything loads: an installed embedded alias, a model directory, an adapter on a
usable base, or a hub id available offline."""

from __future__ import annotations

import os
from pathlib import Path

from persona.core.errors import PersonaError
from persona.models.adapters import adapter_base, adapter_view, is_adapter
from persona.models.embedded import EMBEDDED_MODELS, embedded_gguf_path


def model_on_base(model: str, base_model: str | None, flag: str = "--base_model") -> str:
    """``model``; with ``base_model``, the LoRA adapter ``model`` read as applied on ``base_model`` instead of the
    base its ``adapter_config.json`` records (a view of it in persona's cache; the adapter's files stay as they are)."""
    if base_model is None:
        return model
    if not is_adapter(model):
        raise PersonaError(
            f"{flag} {base_model}: --model {model} is not a LoRA adapter directory, so it has no base to replace. "
            f"Fix: drop {flag}, or give the adapter's directory as --model."
        )
    model_source(base_model, flag)
    return adapter_view(model, base_model)


def model_source(name: str, flag: str = "--model") -> None:
    """An embedded alias that is installed, a local model directory, or a hub id available offline."""

    if is_adapter(name):
        try:
            base = adapter_base(name)
            model_source(base, flag)
        except (PersonaError, ValueError) as error:
            raise PersonaError(
                f"{flag} {name}: a PEFT adapter whose base model can't be used here ({error}). Fix: set "
                "base_model_name_or_path in its adapter_config.json to the base's hub id, local directory or "
                "persona alias (e.g. smollm2-135m)."
            ) from None
        return
    if name in EMBEDDED_MODELS:
        try:
            embedded_gguf_path(name)
        except FileNotFoundError as error:
            raise PersonaError(f"{flag} {name}: {error}") from None
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PersonaError(
                f"{flag} {name}: the directory has no config.json, so it is not a saved model. "
                "Fix: point at the folder model.save_pretrained() wrote (or a PEFT adapter's base model)."
            )
        return
    looks_local = (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix in (".gguf", ".bin", ".pt")
    )
    if looks_local or path.exists():
        raise PersonaError(f"{flag} {name}: no such model directory. Fix: check the path.")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") and not _hub_cached(name):
        raise PersonaError(
            f"{flag} {name}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be "
            "downloaded. Fix: download it first (huggingface-cli download NAME) or pass a local directory."
        )


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
