"""LoRA adapters as models: the base an adapter records, a view of it on another base, and where it came from."""

from __future__ import annotations

from pathlib import Path

from persona.models.embedded import EMBEDDED_MODELS, cache_root


def adapter_base(adapter: str | Path) -> str:
    """The base model a PEFT adapter directory applies to, from its ``adapter_config.json``.

    A recorded path to one of persona's converted caches of an embedded model (from this machine or another:
    ``…/models/smollm2-135m-transformers5``) reads as that model's alias, so adapters move between machines.
    """
    import json

    config_path = Path(adapter).expanduser() / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{config_path}: unreadable adapter config ({error}). Fix: re-save the adapter."
        ) from None
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"{config_path}: no base_model_name_or_path, so the adapter's base model is unknown. Fix: set it to "
            "the base model's hub id, local directory or persona alias (e.g. smollm2-135m)."
        )
    cached = Path(base).name.rsplit("-transformers", 1)[0]
    return cached if cached in EMBEDDED_MODELS and Path(base).name != cached else base


VIEW_MARKER = (
    "persona_adapter_view.json"  # in an adapter view: the adapter it shows, for sidecars and messages
)


def adapter_view(adapter: str | Path, base: str) -> str:
    """A view of ``adapter`` whose recorded base is ``base``: ``adapter_config.json`` rewritten, every other file
    linked, under persona's cache (``…/adapter_views/<key>/<run>/adapter``, so short names still say the run).
    Nothing of the user's adapter changes; the same adapter and base give the same view."""
    import hashlib
    import json

    from persona.core.store import write_json

    source = Path(adapter).expanduser().resolve()
    run = source.parent.name if source.name == "adapter" else source.name
    key = hashlib.sha256(f"{source}\n{base}".encode()).hexdigest()[:16]
    view = cache_root() / "adapter_views" / key / run / "adapter"
    view.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = view / item.name
        if item.name != "adapter_config.json" and not link.exists():
            link.symlink_to(item)
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    write_json(view / "adapter_config.json", {**config, "base_model_name_or_path": base})
    write_json(view / VIEW_MARKER, {"adapter": str(source), "base_model": base})
    return str(view)


def adapter_origin(adapter: str | Path) -> str:
    """The adapter directory the user named: itself, or the one an :func:`adapter_view` shows."""
    import json

    marker = Path(adapter).expanduser() / VIEW_MARKER
    if marker.is_file():
        return json.loads(marker.read_text(encoding="utf-8"))["adapter"]
    return str(Path(adapter).expanduser().resolve())


def base_model_name(name: str) -> str:
    """``name`` itself, or the base of a PEFT adapter directory."""
    return adapter_base(name) if is_adapter(name) else name


def is_adapter(name: str | Path) -> bool:
    """A PEFT adapter directory (applied on a base model) rather than a whole model."""
    return (Path(name).expanduser() / "adapter_config.json").is_file()
