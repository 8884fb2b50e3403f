"""Issue 25: capping ranges from the neutral texts — recorded at extraction, measured once for older files, read by
every bound (``"neutral:p99"``), each checked against a plain ``output_hidden_states`` pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import hidden_states_without_final_norm
from persona.commands.extract import extract
from persona.core.errors import PersonaError
from persona.models import load_model, load_tokenizer
from persona.steering import CapSpec, Gate
from persona.vectors import VECTOR_KINDS, load_metadata, load_vector, save_vector
from persona.vectors.neutral import cache_path, neutral_texts
from persona.vectors.neutral_ranges import neutral_percentiles
from persona.vectors.ranges import (
    NEUTRAL_KEY,
    PERCENTILES_KEY,
    PROJECTION_PERCENTILES,
    resolve_bound,
    stored_neutral,
)

P99 = PROJECTION_PERCENTILES.index(99)


def extracted(tiny_model_dirs, tmp_path, arch: str = "llama") -> dict[str, str]:
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Question {i}?", "positive": f"Cruel answer number {i}.", "negative": f"Kind reply {i}."}
        for i in range(4)
    ]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return extract(
        model=tiny_model_dirs[arch], pairs_path=str(pairs), trait="t", save_dir=str(tmp_path / "v")
    )


def independent_neutral_table(model, tokenizer, arch: str, vector: torch.Tensor, kind: str) -> np.ndarray:
    """One neutral text at a time through HF hidden_states (no hooks): per layer, numpy percentiles of each text's
    activation (tokens but the first, or the last token for prompt_last) on the unit vector."""
    # Same prompts on both sides: the prompt_avg rows are 0, and project everything to 0.
    unit = vector.double() / vector.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projections = []
    for text in neutral_texts():
        ids = tokenizer(text, return_tensors="pt")
        states = torch.stack(hidden_states_without_final_norm(model, arch, **ids))[:, 0].double()
        reading = states[:, -1] if kind == "prompt_last" else states[:, 1:].mean(1)
        projections.append((reading * unit).sum(-1))
    return np.percentile(torch.stack(projections).numpy(), PROJECTION_PERCENTILES, axis=0).T


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_extraction_records_neutral_percentiles_equal_to_a_plain_hidden_states_pass(
    arch, tiny_model_dirs, tmp_path
):
    paths = extracted(tiny_model_dirs, tmp_path, arch)
    model, tokenizer = load_model(tiny_model_dirs[arch]), load_tokenizer(tiny_model_dirs[arch])
    for kind in VECTOR_KINDS:
        record = load_metadata(paths[kind])[NEUTRAL_KEY]
        assert record["percentiles"] == list(PROJECTION_PERCENTILES)
        assert record["n_texts"] == len(neutral_texts()) and PERCENTILES_KEY != NEUTRAL_KEY
        expected = independent_neutral_table(model, tokenizer, arch, load_vector(paths[kind]), kind)
        np.testing.assert_allclose(np.array(record["per_layer"]), expected, rtol=1e-4, atol=1e-4)


def test_an_older_file_is_measured_once_equal_to_extraction_and_cached_by_content(tiny_model_dirs, tmp_path):
    paths = extracted(tiny_model_dirs, tmp_path)
    for kind in ("response_avg", "prompt_last"):
        meta = load_metadata(paths[kind])
        recorded = meta.pop(NEUTRAL_KEY)
        old = save_vector(load_vector(paths[kind]), tmp_path / "old" / f"t_{kind}_diff.pt", meta)
        with pytest.raises(
            ValueError, match=rf"'neutral:p99': .*t_{kind}_diff.json records no {NEUTRAL_KEY}.*Fix"
        ):
            resolve_bound("neutral:p99", path=old, meta=load_metadata(old), layer=2, field="--cap_hi")
        with pytest.raises(PersonaError, match=r"no model was given to measure them\. Fix: pass --model"):
            neutral_percentiles(old, model=None)
        lazy = neutral_percentiles(old, model=tiny_model_dirs["llama"])
        np.testing.assert_allclose(lazy["per_layer"], recorded["per_layer"], rtol=1e-5, atol=1e-6)
        assert cache_path(old, "neutral").is_file()
        # From the cache, no model: the bound resolves to the measured number.
        bound = resolve_bound("neutral:p99", path=old, meta=load_metadata(old), layer=2, field="--cap_hi")
        assert bound == lazy["per_layer"][2][P99]
    # A changed vector file is not read from the old cache: it is measured again.
    save_vector(torch.ones_like(load_vector(old)), old, load_metadata(old))
    assert stored_neutral(old, load_metadata(old)) is None


def test_a_neutral_bound_resolves_to_the_recorded_number_wherever_bounds_are_taken(tiny_model_dirs, tmp_path):
    from persona.commands.generate import resolve_bounds

    path = extracted(tiny_model_dirs, tmp_path)["response_avg"]
    meta = load_metadata(path)
    neutral, negative = meta[NEUTRAL_KEY]["per_layer"][2], meta[PERCENTILES_KEY]["per_layer"][2]
    p5 = PROJECTION_PERCENTILES.index(5)
    assert resolve_bound(" neutral:p99 ", path=path, meta=meta, layer=2, field="hi") == neutral[P99]
    assert resolve_bound("negative:p99", path=path, meta=meta, layer=2, field="hi") == negative[P99]
    assert resolve_bound("p99", path=path, meta=meta, layer=2, field="hi") == negative[P99]
    assert CapSpec.from_file(path, 2, hi="neutral:p99").hi == neutral[P99]
    assert Gate.from_file(path, 2, above="neutral:p5").above == neutral[p5]
    resolved = resolve_bounds(path, 2, {"--cap_hi": "neutral:p99", "--when_below": "neutral:p5"})
    assert resolved == {"cap_hi": neutral[P99], "when_below": neutral[p5]}
    with pytest.raises(ValueError, match=r"'neutral:p99' is a percentile.*from_file"):
        CapSpec(2, load_vector(path), hi="neutral:p99")


@pytest.mark.parametrize("spelling", ["neutral:99", "neutrl:p99", "neutral p99", "neutral:", "Neutral:p99"])
def test_a_bad_spelling_is_one_line_naming_the_accepted_forms(spelling, tmp_path):
    from persona.commands.generate import resolve_bounds

    path = save_vector(torch.randn(4, 8), tmp_path / "t_response_avg_diff.pt", {})
    with pytest.raises(
        ValueError, match=r"neither a number nor a recorded percentile\. Fix: pass a number .*'neutral:p99'"
    ):
        resolve_bound(spelling, path=path, meta={}, layer=1, field="--cap_hi")
    with pytest.raises(PersonaError) as error:
        resolve_bounds(path, 1, {"--cap_hi": spelling})
    assert "\n" not in str(error.value) and "--cap_hi" in str(error.value)


def test_an_unrecorded_neutral_percentile_names_those_recorded(tiny_model_dirs, tmp_path):
    path = extracted(tiny_model_dirs, tmp_path)["response_avg"]
    with pytest.raises(ValueError, match=r"records p1, p5, p25, p50, p75, p95, p99\. Fix"):
        resolve_bound("neutral:p98", path=path, meta=load_metadata(path), layer=1, field="hi")


def test_old_sidecars_without_the_neutral_record_still_resolve_plain_percentiles(tmp_path):
    from persona.vectors.ranges import percentile_record

    table = [[layer * 10 + i for i in range(len(PROJECTION_PERCENTILES))] for layer in range(4)]
    path = save_vector(
        torch.randn(4, 8), tmp_path / "t_response_avg_diff.pt", {PERCENTILES_KEY: percentile_record(table)}
    )
    meta = load_metadata(path)
    assert NEUTRAL_KEY not in meta
    assert resolve_bound("p99", path=path, meta=meta, layer=2, field="hi") == 26.0
    assert CapSpec.from_file(path, 2, hi="p99").hi == 26.0
    with pytest.raises(
        ValueError, match=r"t_response_avg_diff.json records no neutral_projection_percentiles"
    ):
        CapSpec.from_file(path, 2, hi="neutral:p99")


def test_generate_flags_measure_an_older_files_neutral_range_with_the_model(tiny_model_dirs, tmp_path):
    from persona.commands.generate import resolve_bounds

    model = tiny_model_dirs["qwen2"]
    config = load_model(model).config
    vector = torch.randn(
        config.num_hidden_layers + 1, config.hidden_size, generator=torch.Generator().manual_seed(3)
    )
    old = save_vector(vector, tmp_path / "old_prompt_last_diff.pt", {"trait": "old"})
    with pytest.raises(
        PersonaError, match=r"--when_above='neutral:p95': .*old_prompt_last_diff.json records no"
    ):
        resolve_bounds(old, 1, {"--when_above": "neutral:p95"})
    resolved = resolve_bounds(old, 1, {"--when_above": "neutral:p95", "--cap_lo": -1e9}, model)
    expected = independent_neutral_table(
        load_model(model), load_tokenizer(model), "qwen2", vector, "prompt_last"
    )
    assert resolved["when_above"] == pytest.approx(
        expected[1][PROJECTION_PERCENTILES.index(95)], rel=1e-4, abs=1e-5
    )
    assert resolved["cap_lo"] == -1e9 and cache_path(old, "neutral").is_file()


def test_serve_measures_an_older_files_neutral_range_at_start_up_and_reads_it_per_request(
    tiny_model_dirs, tmp_path, monkeypatch
):
    from persona.serve import traits as serve_traits

    model = tiny_model_dirs["llama"]
    lm, tokenizer = load_model(model), load_tokenizer(model)
    config = lm.config
    vector = torch.randn(
        config.num_hidden_layers + 1, config.hidden_size, generator=torch.Generator().manual_seed(4)
    )
    save_vector(vector, tmp_path / "old_response_avg_diff.pt", {"trait": "old"})
    loaded = serve_traits.load_traits(
        tmp_path, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, lm=lm, tokenizer=tokenizer,
        model=model,
    )["old"]  # fmt: skip
    expected = independent_neutral_table(lm, tokenizer, "llama", vector, "response_avg")[1][P99]
    monkeypatch.setattr(
        "persona.vectors.ranges.read_cache", None
    )  # a request reads no file: it would fail here
    assert serve_traits._bound("neutral:p99", loaded, 1, "cap[0].hi") == pytest.approx(
        expected, rel=1e-4, abs=1e-5
    )
    monkeypatch.undo()
    unmeasured = serve_traits.load_traits(
        tmp_path, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size
    )["old"]
    assert NEUTRAL_KEY in unmeasured.meta  # the cache written at the first start-up is read without the model
