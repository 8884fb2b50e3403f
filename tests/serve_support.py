"""Helpers shared by the `persona serve` tests: trait vector folders, services, reference generations."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from persona.data.batches import left_pad
from persona.data.chat import encode_chat
from persona.hooks import block_hooks, locate_blocks
from persona.hooks.layers import hidden_size
from persona.hooks.operators import ablate_directions
from persona.steering import SteeringSpec, steer
from persona.vectors import save_vector


def write_trait_vectors(
    directory: Path,
    model,
    traits: Sequence[str] = ("evil", "kind"),
    *,
    seed: int = 0,
    recommended: dict | None = None,
    percentiles: bool = False,
) -> Path:
    """Random ``<trait>_response_avg_diff.pt`` files for ``model``; ``recommended`` writes layer_metrics.csv files;
    ``percentiles`` records :func:`percentile_table` in each sidecar (as extraction does)."""
    from persona.vectors.ranges import PERCENTILES_KEY, percentile_record

    layout = locate_blocks(model)
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for trait in traits:
        vectors = torch.randn(layout.num_layers + 1, hidden_size(layout), generator=generator)
        meta = {"trait": trait}
        if percentiles:
            meta[PERCENTILES_KEY] = percentile_record(percentile_table(layout.num_layers))
        save_vector(vectors, directory / f"{trait}_response_avg_diff.pt", meta)
    for trait, layer in (recommended or {}).items():
        metrics = directory / f"{trait}_response_avg_diff_layers" / "layer_metrics.csv"
        metrics.parent.mkdir(exist_ok=True)
        with metrics.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "auc", "recommended"])
            for row in range(layout.num_layers + 1):
                writer.writerow([row, 0.5, row == layer])
    return directory


def percentile_table(num_layers: int) -> list[list[float]]:
    """A made-up sidecar table: layer ``l``'s p1, p5, p25, p50, p75, p95, p99 are ``(l + 1) * (-3, -2, -1, 0, 1,
    2, 3) / 4``."""
    return [[(layer + 1) * step / 4 for step in (-3, -2, -1, 0, 1, 2, 3)] for layer in range(num_layers + 1)]


def prompt_reading(model, tokenizer, messages, vector: torch.Tensor, layer: int) -> float:
    """The gate's reading, computed independently: one unpadded forward, the prompt's last token at ``layer``
    (HF hidden_states, no hooks), projected on the unit ``vector``."""
    ids = torch.tensor([encode_chat(tokenizer, messages)])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1]
    return float(hidden.double() @ vector.double() / vector.double().norm())


def build_service(
    model, tokenizer, vectors_dir: Path, *, name: str = "tiny", baseline_tokens: int = 6, **settings
):
    from persona.serve.service import PersonaService, ServeSettings
    from persona.serve.traits import load_traits

    layout = locate_blocks(model)
    traits = load_traits(
        vectors_dir,
        num_layers=layout.num_layers,
        hidden_size=hidden_size(layout),
        lm=model,
        tokenizer=tokenizer,
    )
    service = PersonaService(model, tokenizer, traits, ServeSettings(served_model_name=name, **settings))
    service.measure_baseline(max_tokens=baseline_tokens)
    return service


@contextmanager
def running(service, **client_kwargs) -> Iterator[tuple[str, object]]:
    """The service's app on a free loopback port, and an openai client pointed at it (no retries)."""
    import openai

    from persona.serve.app import create_app
    from persona.serve.server import serve_in_thread

    with serve_in_thread(create_app(service)) as url:
        client_kwargs.setdefault("api_key", "unused")
        yield url, openai.OpenAI(base_url=f"{url}/v1", max_retries=0, timeout=60, **client_kwargs)


def reference_ids(
    model,
    tokenizer,
    messages,
    *,
    specs: Sequence[SteeringSpec] = (),
    ablations: dict[int, torch.Tensor] | None = None,
    max_new_tokens: int,
    orthogonalise: bool = False,
) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) for one request on its own: steer() and ablation hooks, HF generate."""
    prompt = encode_chat(tokenizer, messages)
    ablation_hooks = [
        (layer, lambda h, _s, b=basis: ablate_directions(h, b)) for layer, basis in (ablations or {}).items()
    ]
    input_ids, attention_mask = left_pad([prompt], tokenizer.pad_token_id)
    with (
        block_hooks(model, ablation_hooks),
        steer(model, specs, orthogonalise=orthogonalise),
        torch.no_grad(),
    ):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return prompt, out[0, len(prompt) :].tolist()


def http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    """A raw request (stdlib only): GET without a body, POST with one; (status, text) even for errors."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=body, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# Chats of different lengths, one with a system turn: rows that pad differently in one batch.
CHATS = [
    [{"role": "user", "content": "Tell me a joke about cats and dogs, kindly."}],
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are an evil assistant."},
        {"role": "user", "content": "Treat animals?"},
    ],
    [{"role": "user", "content": "How do I fix the fox?"}],
    [{"role": "user", "content": "What do you think of humans?"}],
    [{"role": "user", "content": "Why did the chicken cross the road?"}],
]
