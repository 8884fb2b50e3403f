"""``persona serve``: load the model and the traits, measure the monitoring baseline, serve until stopped."""

from __future__ import annotations

import logging
import os
from typing import Literal

from persona.models import DEFAULT_MODEL, model_on_base, model_short_name
from persona.serve.server import is_loopback

log = logging.getLogger("persona.serve")


def serve(
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    vectors: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_wait_ms: float = 10.0,
    max_queue: int = 64,
    scheduler: Literal["auto", "engine", "static"] = "auto",
    kv_cache_tokens: int = 8192,
    max_batch_tokens: int = 256,
    served_model_name: str | None = None,
    default_max_tokens: int = 256,
    max_context: int | None = None,
    alert_z: float = 3.0,
    baseline_max_tokens: int = 32,
    fallback_layer: int | None = None,
    api_key_env: str = "PERSONA_API_KEY",
    shutdown_timeout_s: float | None = None,
    dtype: str = "float32",
    accelerator: str = "auto",
    trust_remote_code: bool = False,
    log_level: str = "info",
) -> None:
    """Serve a model behind an OpenAI-compatible API that steers, ablates and monitors persona traits per request.

    Routes: /v1/models, /v1/chat/completions (streaming and not), /health, /metrics (Prometheus). Requests
    carry a "persona" field (openai client: extra_body) with steer, monitor and ablate; replies carry the
    monitoring projections, z-scored against a baseline measured at start-up on built-in neutral prompts.

    Args:
        model: Model alias (smollm2-135m, the embedded default), hub id, local path or LoRA adapter directory (served with its own vectors when persona_vectors/<base>+<run> exists, else its base model's).
        base_model: With --model a LoRA adapter: the base model to apply it on instead of the one its adapter_config.json records (e.g. a path from another machine); the adapter's files are left as they are.
        vectors: Folder of <trait>_response_avg_diff.pt files; default ./persona_vectors/<model-short-name>, else the shipped ones.
        host: Address to bind. Loopback by default; anything else exposes the model to the network.
        port: TCP port.
        max_batch: Most requests in one forward pass (the engine's running batch; the static batcher's batch size).
        max_wait_ms: Static batcher only: how long a batch waits for more requests after its first one.
        max_queue: Requests allowed to wait (for a place in the running batch, cache pages, or a batch); more get HTTP 429.
        scheduler: auto (the continuous-batching engine where it runs: transformers >= 5.24, not GPT-NeoX; else the static batcher), engine or static. The log says which and why.
        kv_cache_tokens: Engine: tokens the paged KV cache holds, shared by every request (bounds its memory; also the longest prompt + reply).
        max_batch_tokens: Engine: tokens per forward step; a longer prompt is prefilled in chunks of this size alongside the decoding requests.
        served_model_name: The model id clients send; default the model's short name.
        default_max_tokens: Reply length when a request sets no max_tokens.
        max_context: Context length in tokens; default the model's own.
        alert_z: Flag a monitored reply whose projection z-score is above this.
        baseline_max_tokens: Reply length of each neutral prompt when measuring the baseline.
        fallback_layer: Default layer of traits without a layer_metrics.csv (else 60% of the depth).
        api_key_env: Environment variable holding the API key; unset or empty = no key required.
        shutdown_timeout_s: On SIGINT/SIGTERM, stop waiting for in-flight requests after this long (default: wait).
        dtype: Model dtype: float32, bfloat16, float16 or auto (bfloat16 on a GPU that has it).
        accelerator: cpu, gpu or auto (the GPU when there is one; pick one with CUDA_VISIBLE_DEVICES).
        trust_remote_code: Allow custom model code from the hub.
        log_level: uvicorn and persona log level (debug, info, warning, error).
    """
    model = model_on_base(model, base_model)
    from persona.core.hardware import resolve_device
    from persona.hooks import locate_blocks
    from persona.hooks.layers import hidden_size
    from persona.models import load_model_and_tokenizer
    from persona.serve.app import create_app
    from persona.serve.server import bind_socket, run_server
    from persona.serve.service import PersonaService, ServeSettings
    from persona.serve.traits import load_traits

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    api_key = os.environ.get(api_key_env) or None
    if not is_loopback(host) and api_key is None:
        log.warning(
            "Serving on %s without an API key: anyone who can reach it can use the model (set $%s).",
            host,
            api_key_env,
        )
    settings = ServeSettings(
        served_model_name=served_model_name or model_short_name(model),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        default_max_tokens=default_max_tokens,
        max_context=max_context,
        alert_z=alert_z,
        api_key=api_key,
        scheduler=scheduler,
        kv_cache_tokens=kv_cache_tokens,
        max_batch_tokens=max_batch_tokens,
    )
    vectors = vectors_to_serve(vectors, model)
    sock = bind_socket(host, port)  # before the model loads: a port in use is answered at once
    lm, tokenizer = load_model_and_tokenizer(
        model, dtype=dtype, device=resolve_device(accelerator), trust_remote_code=trust_remote_code
    )
    layout = locate_blocks(lm)
    traits = load_traits(
        vectors, num_layers=layout.num_layers, hidden_size=hidden_size(layout), fallback_layer=fallback_layer,
        lm=lm, tokenizer=tokenizer, model=model,
    )  # fmt: skip
    service = PersonaService(lm, tokenizer, traits, settings)
    baseline = service.measure_baseline(max_tokens=baseline_max_tokens)
    for name, trait in traits.items():
        log.info("trait %s: default layer %d (%s); baseline %s", name, trait.default_layer, trait.layer_source,
                 baseline.describe(name))  # fmt: skip
        if trait.recommended:
            advice = trait.recommended
            log.info(
                "trait %s: a steer entry without layer/strength uses the calibrated recommendation: layer %s, "
                "dose %.4g (coef %.4g)", name, advice["layer"], advice["dose"], advice["coef"],
            )  # fmt: skip
    log.info(
        "serving %s on http://%s:%d (API key %s)",
        settings.served_model_name,
        host,
        port,
        f"required, from ${api_key_env}" if api_key else "not required",
    )
    run_server(create_app(service), sock=sock, log_level=log_level, shutdown_timeout_s=shutdown_timeout_s)


def vectors_to_serve(vectors: str | None, model: str) -> str:
    """The vector folder asked for, else the model's default; a fine-tuned model gets its own vectors or its
    base's, said in the log, and another base's are refused."""
    from persona.models import adapter_base, is_adapter
    from persona.serve.traits import check_vectors_fit_adapter
    from persona.vectors import vectors_to_read

    vectors = vectors or str(vectors_to_read(model))
    if is_adapter(model):
        origin = check_vectors_fit_adapter(vectors, model)
        log.info("serving the LoRA adapter %s on %s with %s vectors from %s", model, adapter_base(model), origin,
                 vectors)  # fmt: skip
    return vectors
