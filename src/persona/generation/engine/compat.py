"""Where the engine runs: the transformers versions whose continuous-batching internals it was checked against, the
architectures it refuses, and the manager configuration it asks for (nothing sized from free memory)."""

from __future__ import annotations

from torch import nn

from persona.generation.engine.requests import EngineConfig

UNSUPPORTED = {
    "gpt_neox": "its attention takes the cache as `layer_past` and ignores the paged cache, so continuous "
    "batching gives different tokens from generate (transformers 5.24)",
}


def cb_config(config: EngineConfig):
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingConfig(
        num_blocks=config.num_blocks,
        page_size=config.page_size,
        max_batch_tokens=config.max_batch_tokens,
        max_requests_per_batch=config.max_requests_per_batch,
        allow_block_sharing=False,
        use_cuda_graph=False,
        use_async_batching=False,
        max_queue_size=config.max_queue_size,
    )


MIN_TRANSFORMERS = (5, 24)
"""The oldest transformers whose continuous-batching internals the engine reads were checked against (5.24 and
5.25 pass its pins; the internals appear around 5.10, 4.56 crashes on the CPU). Below it, the static path."""


def unavailable(model: nn.Module) -> str | None:
    """Why the engine cannot run ``model`` here (one line), or None: the transformers version, the architecture."""
    try:
        check_transformers()
    except RuntimeError as error:
        return str(error)
    model_type = getattr(model.config, "model_type", "")
    if model_type in UNSUPPORTED:
        return f"The engine cannot run {model_type}: {UNSUPPORTED[model_type]}."
    return None


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers older than :data:`MIN_TRANSFORMERS` with one line, before any manager starts."""
    import re
    from importlib.metadata import version as installed

    version = version or installed("transformers")
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_TRANSFORMERS:
        wanted = ".".join(map(str, MIN_TRANSFORMERS))
        raise RuntimeError(
            f"The continuous-batching engine needs transformers >= {wanted} (found {version}). Fix: upgrade "
            f"transformers (pip install 'transformers>={wanted}'), or use the static path (persona serve, "
            "persona generate), which runs on every supported version."
        )
