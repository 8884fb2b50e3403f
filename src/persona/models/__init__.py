"""Models and tokenizers: the embedded SmolLM2 (``embedded``), loading and dimensions (``loading``), LoRA adapters
as models (``adapters``) and the checks of a model name before anything loads (``sources``).

May import: ``persona.core``. Everything above reads a model's shape and files through here.
"""

from persona.models.adapters import (
    VIEW_MARKER,
    adapter_base,
    adapter_origin,
    adapter_view,
    base_model_name,
    is_adapter,
)
from persona.models.embedded import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    cache_root,
    embedded_gguf_path,
)
from persona.models.loading import (
    CONTEXT_FIELDS,
    PAD_CANDIDATES,
    PLACEHOLDER_LIMIT,
    context_length,
    ensure_pad_token,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_dimensions,
    model_short_name,
    resolve_model_path,
    shared_models,
    text_config_value,
)
from persona.models.sources import model_on_base, model_source

__all__ = [
    "CONTEXT_FIELDS",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "PAD_CANDIDATES",
    "PLACEHOLDER_LIMIT",
    "VIEW_MARKER",
    "EmbeddedModel",
    "adapter_base",
    "adapter_origin",
    "adapter_view",
    "base_model_name",
    "cache_root",
    "context_length",
    "embedded_gguf_path",
    "ensure_pad_token",
    "is_adapter",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_dimensions",
    "model_on_base",
    "model_short_name",
    "model_source",
    "resolve_model_path",
    "shared_models",
    "text_config_value",
]
