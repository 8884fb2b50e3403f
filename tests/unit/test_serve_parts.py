"""`persona serve` pieces that need no model: text streaming, sampling, baseline z-scores, trait files, parsing."""

from __future__ import annotations

import pytest
import torch

from persona.generation.sampling import sample_token, top_p_filter
from persona.serve.monitoring import Baseline, monitor_report
from persona.serve.sampling import RowSampler, SamplingParams
from persona.serve.schema import ApiError, parse_chat_request
from persona.serve.server import is_loopback
from persona.serve.tracker import find_stop, streamable_prefix
from persona.serve.traits import MonitorTarget, load_traits
from persona.vectors import save_vector


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("Hello wor", [], "Hello wor"),
        ("Hello wor", ["world"], "Hello "),  # might be the start of the stop sequence: held back
        ("Hello w", ["wx", "ab"], "Hello "),
        ("Hello", ["lo!"], "Hel"),
        ("Hello!", ["xyz"], "Hello!"),
        ("caf\ufffd", [], "caf"),  # half a UTF-8 character
    ],
)
def test_streamable_prefix_holds_back_partial_stops_and_characters(text, stops, expected):
    assert streamable_prefix(text, stops) == expected


def test_find_stop_returns_the_earliest_stop():
    assert find_stop("abc END xyz STOP", ["STOP", "END"]) == 4
    assert find_stop("nothing here", ["STOP"]) is None


def test_top_p_keeps_the_smallest_set_holding_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [True, False, False, False]  # always one
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sample_token_is_seeded_and_falls_back_on_non_finite_logits():
    logits = torch.randn(50)
    draws = [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1] and draws[0].dim() == 0  # a tensor: no host sync per sampled row on a GPU
    expected = torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(3))[0]
    assert draws[0] == expected  # the same draw as sampling the softmax directly
    assert sample_token(torch.full((5,), float("nan")), 1.0, 1.0, torch.Generator()) in range(5)
    spiked = torch.full((5,), -1e9)
    spiked[2] = 0.0
    assert sample_token(spiked, 0.7, 0.9, torch.Generator()) == 2


def test_row_sampler_masks_end_of_sequence_until_min_tokens_and_samples_only_sampled_rows():
    params = [SamplingParams(), SamplingParams(min_tokens=2), SamplingParams(temperature=1.0, seed=1)]
    sampler = RowSampler(params, prompt_width=4, eos_ids=[2], device="cpu")
    scores = torch.zeros(3, 6)
    scores[:, 2] = 10.0
    out = sampler(torch.zeros(3, 5, dtype=torch.long), scores)  # one token generated so far
    assert torch.equal(out[0], scores[0])  # greedy and no min_tokens: untouched
    assert out[1, 2] == float("-inf") and out[1].argmax() != 2
    assert torch.isfinite(out[2]).sum() == 1  # the drawn token is the only finite one
    later = sampler(torch.zeros(3, 6, dtype=torch.long), scores)
    assert later[1, 2] == 10.0


def test_z_scores_and_one_sided_alerts():
    baseline = Baseline.from_values(
        {("evil", "prompt_last"): [1.0, 2.0, 3.0], ("evil", "response_avg"): [0.0, 0.0]}
    )
    assert baseline.z("evil", "prompt_last", 4.0) == pytest.approx(2.0)
    assert baseline.z("evil", "response_avg", 1.0) is None  # no spread: no z
    assert baseline.z("evil", "prompt_last", None) is None
    target = MonitorTarget("evil", 3, torch.zeros(4))
    report = monitor_report([(target, (6.0, None))], baseline, alert_z=3.0)
    assert report["evil"]["alert"] and report["evil"]["prompt_last"]["z"] == pytest.approx(4.0)
    calm = monitor_report([(target, (-10.0, 0.0))], baseline, alert_z=3.0)
    assert not calm["evil"]["alert"]  # far on the other side of the trait is no alert


def test_load_traits_checks_shapes_and_picks_default_layers(tmp_path):
    save_vector(torch.randn(5, 8), tmp_path / "evil_response_avg_diff.pt")
    save_vector(torch.randn(5, 8), tmp_path / "evil_prompt_last_diff.pt")  # other kinds are not traits
    traits = load_traits(tmp_path, num_layers=4, hidden_size=8)
    assert list(traits) == ["evil"] and traits["evil"].default_layer == 2  # round(0.6 * 4)
    assert (
        load_traits(tmp_path, num_layers=4, hidden_size=8, fallback_layer=3)["evil"].layer_source
        == "fallback_layer"
    )
    with pytest.raises(ValueError, match="hidden size"):
        load_traits(tmp_path, num_layers=4, hidden_size=16)
    with pytest.raises(ValueError, match="no <trait>_response_avg_diff.pt"):
        load_traits(_empty(tmp_path), num_layers=4, hidden_size=8)
    with pytest.raises(FileNotFoundError, match="--vectors"):
        load_traits(tmp_path / "missing", num_layers=4, hidden_size=8)


def _empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_vector_files_load_without_unpickling(tmp_path):
    torch.save({"not": "a tensor"}, tmp_path / "evil_response_avg_diff.pt")
    with pytest.raises(ValueError, match="not a vector file: it holds a dict"):
        load_traits(tmp_path, num_layers=4, hidden_size=8)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}', "messages.0.role"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}',
            "stop",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true}', "logprobs"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "persona": {"stear": []}}',
            "persona.stear",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p"),
    ],
)
def test_parse_refuses_what_it_cannot_honour(body, param):
    with pytest.raises(ApiError) as raised:
        parse_chat_request(body)
    assert raised.value.status == 400 and raised.value.param == param


def test_parse_accepts_openai_shapes():
    request = parse_chat_request(
        b'{"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be"}, '
        b'{"type": "text", "text": " brief."}]}, {"role": "user", "content": "Hi", "name": "ann"}], '
        b'"max_completion_tokens": 5, "stop": "END", "presence_penalty": 0, "user": "u1"}'
    )
    assert [m.as_chat_turn() for m in request.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert request.requested_max_tokens() == 5 and request.stop_sequences() == ("END",)


def test_only_loopback_counts_as_loopback():
    assert (
        is_loopback("127.0.0.1")
        and is_loopback("::1")
        and is_loopback("localhost")
        and is_loopback("127.5.0.1")
    )
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


@pytest.mark.parametrize("field", ["max_batch", "max_queue", "default_max_tokens"])
def test_settings_out_of_range_are_refused_before_any_model_loads(field):
    from persona.serve.service import ServeSettings

    with pytest.raises(ValueError, match=f"--{field}=0"):
        ServeSettings("m", **{field: 0})


@pytest.mark.parametrize("stream, stop", [(False, []), (True, []), (False, ["zz"])])
def test_a_reply_is_decoded_per_token_only_when_streamed_or_watched_for_stops(monkeypatch, stream, stop):
    """Decoding the whole reply at every token is O(length) per step; a plain request decodes once at the end."""
    import types

    import persona.serve.tracker as tracker

    calls = []
    monkeypatch.setattr(tracker, "answer_text", lambda tok, ids: calls.append(len(ids)) or "ab" * len(ids))
    sent = []
    job = types.SimpleNamespace(stream=stream, stop=stop, max_tokens=5, monitor=[], emit=sent.append)
    row = tracker.RowState(job, tokenizer=None, eos_ids=frozenset({0}))
    assert [row.step(token) for token in (7, 8, 9, 10, 11)] == [False, False, False, False, True]
    assert row.text == "ab" * 5 and row.finish_reason == "length"
    assert calls == ([1, 2, 3, 4, 5] if stream or stop else [5])
    eos_row = tracker.RowState(job, tokenizer=None, eos_ids=frozenset({0}))
    assert [eos_row.step(token) for token in (7, 8, 0)] == [False, False, True]
    assert eos_row.text == "ab" * 2 and eos_row.finish_reason == "stop" and eos_row.ended_by_eos
