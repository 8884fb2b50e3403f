"""`persona serve` over a real loopback socket, driven by the official openai client (tiny Llama loaded by path).

Every test runs on both schedulers: the continuous-batching engine (what ``--scheduler auto`` picks on this
transformers) and the static batcher (what remains where the engine cannot run)."""

from __future__ import annotations

import json
import socket
import threading
import time

import openai
import pytest
import torch

from persona.data.chat import answer_text, encode_chat
from persona.models import load_model_and_tokenizer
from persona.steering import CapSpec, SteeringSpec
from persona.vectors.dose import neutral_texts
from persona.vectors.norms import mean_residual_norm
from serve_support import (
    build_service,
    http,
    percentile_table,
    prompt_reading,
    reference_ids,
    running,
    write_trait_vectors,
)

HI = [{"role": "user", "content": "Tell me a joke about cats and dogs."}]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dirs):
    return load_model_and_tokenizer(tiny_model_dirs["llama"])


@pytest.fixture(scope="module")
def vectors_dir(model_and_tokenizer, tmp_path_factory):
    model, _ = model_and_tokenizer
    return write_trait_vectors(
        tmp_path_factory.mktemp("vectors"), model, recommended={"evil": 1}, percentiles=True
    )


_TRANSFORMERS = tuple(int(part) for part in __import__("transformers").__version__.split(".")[:2])
ENGINE_RUNS = (
    _TRANSFORMERS >= __import__("persona.generation.engine.core").generation.engine.core.MIN_TRANSFORMERS
)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(
            "engine",
            marks=pytest.mark.skipif(not ENGINE_RUNS, reason="the engine needs transformers >= 5.24"),
        ),
        "static",
    ],
)
def scheduler(request):
    return request.param


@pytest.fixture(scope="module")
def server(model_and_tokenizer, vectors_dir, scheduler):
    model, tokenizer = model_and_tokenizer
    service = build_service(model, tokenizer, vectors_dir, max_batch=4, max_wait_ms=5, scheduler=scheduler)
    assert service.scheduler == scheduler
    with running(service) as (url, client):
        yield url, client, service


def chat(client, **kwargs):
    kwargs.setdefault("messages", HI)
    kwargs.setdefault("max_tokens", 6)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", **kwargs)


def test_models_lists_the_traits_with_their_default_layers_and_baseline(server):
    _, client, _ = server
    (model,) = client.models.list().data
    assert model.id == "tiny"
    persona = model.model_extra["persona"]
    assert persona["num_layers"] == 3 and persona["context_length"] == 256
    evil, kind = persona["traits"]["evil"], persona["traits"]["kind"]
    assert (evil["default_layer"], evil["default_layer_source"]) == (1, "layer_metrics")
    assert (kind["default_layer"], kind["default_layer_source"]) == (2, "depth")  # round(0.6 * 3)
    assert evil["baseline"]["response_avg"]["n"] == 16
    assert client.models.retrieve("tiny").id == "tiny"


def test_plain_reply_is_the_models_greedy_reply(server, model_and_tokenizer):
    _, client, _ = server
    reply = chat(client)
    prompt, ids = reference_ids(*model_and_tokenizer, HI, max_new_tokens=6)
    assert reply.choices[0].message.content == answer_text(model_and_tokenizer[1], ids)
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 6)
    assert reply.model_extra["persona"] == {"steer": [], "ablate": []}


def test_steered_reply_equals_steer_on_its_own_and_differs_from_plain(
    server, model_and_tokenizer, vectors_dir
):
    _, client, service = server
    body = {"persona": {"steer": [{"trait": "evil", "coef": 4.0, "positions": "all"}]}}
    reply = chat(client, extra_body=body)
    spec = SteeringSpec(1, service.traits["evil"].vectors, 4.0, positions="all")
    _, steered = reference_ids(*model_and_tokenizer, HI, specs=[spec], max_new_tokens=6)
    _, plain = reference_ids(*model_and_tokenizer, HI, max_new_tokens=6)
    assert steered != plain
    assert reply.choices[0].message.content == answer_text(model_and_tokenizer[1], steered)
    # The dose beside the coefficient, against an independent norm: layer 1 over the neutral texts.
    norm = mean_residual_norm(*model_and_tokenizer, neutral_texts(), 1)
    dose = 4.0 * float(service.traits["evil"].vectors[1].norm()) / norm
    echo = reply.model_extra["persona"]["steer"][0]
    assert echo.pop("dose") == pytest.approx(dose, rel=1e-5)
    assert echo == {
        "trait": "evil", "coef": 4.0, "layer": 1, "positions": "all", "strength": "request", "layer_from": "default"
    }  # fmt: skip


def test_monitored_reply_reports_projections_z_scores_and_alert(server):
    _, client, service = server
    plain = chat(client, extra_body={"persona": {"monitor": ["evil", "kind"]}}).model_extra["persona"]
    assert set(plain["monitor"]) == {"evil", "kind"} and plain["alert_z"] == 3.0
    entry = plain["monitor"]["evil"]
    assert entry["layer"] == 1
    for kind in ("prompt_last", "response_avg"):
        mean, std, _ = service.baseline.stats[("evil", kind)]
        assert entry[kind]["z"] == pytest.approx((entry[kind]["projection"] - mean) / std)
    pushed = chat(
        client,
        extra_body={
            "persona": {"monitor": ["evil"], "steer": [{"trait": "evil", "coef": 3.0, "positions": "all"}]}
        },
    ).model_extra["persona"]
    # All positions pushed by 3 vectors: the unit projection grows by 3 * |v| exactly at that layer.
    norm = float(service.traits["evil"].vectors[1].norm())
    assert pushed["monitor"]["evil"]["prompt_last"]["projection"] == pytest.approx(
        entry["prompt_last"]["projection"] + 3 * norm, rel=1e-4
    )
    assert pushed["monitor"]["evil"]["alert"] and pushed["alert"]


def test_streaming_sends_the_same_text_in_chunks_and_monitoring_in_the_final_chunk(server):
    _, client, _ = server
    body = {"persona": {"monitor": ["evil"]}}
    whole = chat(client, max_tokens=12, extra_body=body)
    chunks = list(
        chat(client, max_tokens=12, extra_body=body, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.choices[0].finish_reason == "length"
    assert final.model_extra["persona"]["monitor"] == whole.model_extra["persona"]["monitor"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stop_sequences_cut_the_reply_as_openai_does(server):
    _, client, _ = server
    full = chat(client, max_tokens=12).choices[0].message.content
    stop = full[3:5]
    cut = chat(client, max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]


def test_seeded_sampling_repeats_and_differs_across_seeds(server):
    _, client, _ = server
    replies = [
        chat(client, temperature=1.0, seed=seed, max_tokens=10).choices[0].message.content
        for seed in (1, 1, 2)
    ]
    assert replies[0] == replies[1] != replies[2]


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        (
            {"extra_body": {"persona": {"steer": [{"trait": "nope", "coef": 1}]}}},
            404,
            "persona.steer.0.trait",
        ),
        ({"extra_body": {"persona": {"monitor": ["nope"]}}}, 404, "persona.monitor.0"),
        (
            {"extra_body": {"persona": {"steer": [{"trait": "evil", "coef": 1, "layer": 4}]}}},
            400,
            "persona.steer.0.layer",
        ),
        (
            {"extra_body": {"persona": {"ablate": [{"trait": "evil", "layer": -1}]}}},
            400,
            "persona.ablate.0.layer",
        ),
        (
            {"extra_body": {"persona": {"steer": [{"trait": "evil", "coef": "nan"}]}}},
            400,
            "persona.steer.0.coef",
        ),
        ({"extra_body": {"persona": {"steer": [{"trait": "evil", "cof": 1}]}}}, 400, "persona.steer.0.cof"),
        ({"max_tokens": 300}, 413, "messages"),
        ({"messages": [{"role": "user", "content": "cat " * 300}]}, 413, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"n": 2}, 400, "n"),
        ({"temperature": 3}, 400, "temperature"),
        # Issue 20.3: the CLI's chat-record rule (persona.data.chat.checked_messages), not only pydantic's roles
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "messages"),
        ({"messages": [*HI, {"role": "system", "content": "Late."}]}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors_with_their_status(server, kwargs, status, param):
    _, client, _ = server
    with pytest.raises(openai.APIStatusError) as raised:
        chat(client, **kwargs)
    assert raised.value.status_code == status
    error = raised.value.body
    assert error["param"] == param and error["message"] and error["type"]


EVIL = {"trait": "evil", "coef": 4.0, "positions": "all"}


@pytest.mark.parametrize(
    ("persona", "status", "param", "fix"),
    [
        ({"cap": [{"trait": "evil", "hi": "p42"}]}, 400, "persona.cap.0.hi", "p99"),
        ({"cap": [{"trait": "evil", "lo": 1.0, "hi": -1.0}]}, 400, "persona.cap.0.lo", "lo <= hi"),
        ({"cap": [{"trait": "evil", "high": 1.0}]}, 400, "persona.cap.0.high", ""),
        ({"cap": [{"trait": "nope"}]}, 404, "persona.cap.0.trait", "/v1/models"),
        ({"steer": [{**EVIL, "when": {"trait": "kind", "above": 0, "below": 1}}]}, 400,
         "persona.steer.0.when.above", "exactly one"),
        ({"steer": [{**EVIL, "when": {"trait": "kind"}}]}, 400, "persona.steer.0.when.above", "exactly one"),
        ({"steer": [{**EVIL, "when": {"trait": "kind", "layer": 2, "above": 0}}]}, 400,
         "persona.steer.0.when.layer", "<= 1"),
        ({"steer": [{**EVIL, "when": {"trait": "nope", "above": 0}}]}, 404, "persona.steer.0.when.trait", ""),
        ({"ablate": [{"trait": "evil", "layer": "all", "when": {"trait": "evil", "above": 0}}]}, 400,
         "persona.ablate.0.layer", "one layer"),
        ({"steer": [{**EVIL, "layer": 1}, {**EVIL, "coef": 2.0, "layer": 1}], "orthogonalise": True}, 400,
         "persona.orthogonalise", "Fix"),
    ],
)  # fmt: skip
def test_bad_cap_gate_and_orthogonalise_fields_get_one_line_errors_naming_them(
    server, persona, status, param, fix
):
    _, client, _ = server
    with pytest.raises(openai.APIStatusError) as raised:
        chat(client, extra_body={"persona": persona})
    assert raised.value.status_code == status
    error = raised.value.body
    assert error["param"] == param and "\n" not in error["message"] and fix in error["message"], error


def test_a_conditional_entry_says_whether_it_fired_and_equals_steer_alone(server, model_and_tokenizer):
    _, client, service = server
    model, tokenizer = model_and_tokenizer
    evil = service.traits["evil"].vectors
    reading = prompt_reading(model, tokenizer, HI, evil[1], 1)  # against "p50" = 0 at layer 1
    assert reading != 0
    _, plain = reference_ids(model, tokenizer, HI, max_new_tokens=6)
    _, steered = reference_ids(
        model, tokenizer, HI, specs=[SteeringSpec(1, evil, 4.0, positions="all")], max_new_tokens=6
    )
    assert steered != plain
    for side, fires in (("above", reading > 0), ("below", reading < 0)):
        reply = chat(
            client, extra_body={"persona": {"steer": [{**EVIL, "when": {"trait": "evil", side: "p50"}}]}}
        )
        when = reply.model_extra["persona"]["steer"][0]["when"]
        assert when == {"trait": "evil", "layer": 1, side: 0.0, "requested": "p50", "fired": fires}
        expected = steered if fires else plain
        assert reply.choices[0].message.content == answer_text(tokenizer, expected), side
    gated_ablation = {"ablate": [{"trait": "evil", "layer": 1, "when": {"trait": "evil", "above": "p50"}}]}
    echo = chat(client, extra_body={"persona": gated_ablation}).model_extra["persona"]["ablate"][0]
    assert echo["layers"] == [1] and echo["when"]["fired"] == (reading > 0)


def test_caps_echo_their_resolved_bounds_and_equal_steer_alone(server, model_and_tokenizer):
    _, client, service = server
    table = percentile_table(3)  # p1 .. p99 per layer, as the sidecars record them
    caps = [{"trait": "evil"}, {"trait": "kind", "layer": 2, "lo": "p5", "hi": 0.25, "positions": "response"}]
    reply = chat(client, extra_body={"persona": {"cap": caps}})
    echo = reply.model_extra["persona"]["cap"]
    assert echo == [
        {"trait": "evil", "layer": 1, "lo": None, "hi": table[1][6], "positions": "all",
         "requested": {"lo": None, "hi": "p99"}},
        {"trait": "kind", "layer": 2, "lo": table[2][1], "hi": 0.25, "positions": "response",
         "requested": {"lo": "p5", "hi": 0.25}},
    ]  # fmt: skip
    specs = [
        CapSpec(1, service.traits["evil"].vectors, None, table[1][6]),
        CapSpec(2, service.traits["kind"].vectors, table[2][1], 0.25, positions="response"),
    ]
    _, capped = reference_ids(*model_and_tokenizer, HI, specs=specs, max_new_tokens=6)
    assert reply.choices[0].message.content == answer_text(model_and_tokenizer[1], capped)


def test_orthogonalised_steering_reports_the_overlap_and_equals_steer_alone(server, model_and_tokenizer):
    _, client, service = server
    entries = [{**EVIL, "layer": 1}, {"trait": "kind", "coef": 3.0, "layer": 1, "positions": "all"}]
    reply = chat(client, extra_body={"persona": {"steer": entries, "orthogonalise": True}})
    (overlap,) = reply.model_extra["persona"]["orthogonalised"]
    evil, kind = service.traits["evil"].vectors[1], service.traits["kind"].vectors[1]
    cosine = float(torch.nn.functional.cosine_similarity(evil.double(), kind.double(), dim=0))
    assert overlap["layer"] == 1 and overlap["traits"] == ["evil", "kind"]
    flat = [value for row in overlap["cosines"] for value in row]
    assert flat == pytest.approx([1.0, cosine, cosine, 1.0], abs=1e-5)
    specs = [SteeringSpec(1, evil, 4.0, positions="all"), SteeringSpec(1, kind, 3.0, positions="all")]
    _, ortho = reference_ids(*model_and_tokenizer, HI, specs=specs, orthogonalise=True, max_new_tokens=6)
    assert reply.choices[0].message.content == answer_text(model_and_tokenizer[1], ortho)


def test_unknown_model_is_404(server):
    _, client, _ = server
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert raised.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "tiny", "messages": [', "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (
            b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"persona":{"steer":[{"trait":"evil","coef":NaN}]}}',
            "invalid_value",
        ),
        (
            b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"persona":{"steer":[{"trait":"evil","coef":Infinity}]}}',
            "invalid_value",
        ),
        (
            b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"persona":{"steer":[{"trait":"evil","coef":1e999}]}}',
            "invalid_value",
        ),
        # Issue 20.7: 200 KB of nested brackets was a RecursionError and a 500 (its traceback logged twice)
        (b"[" * 200_000, "invalid_json"),
        (
            b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"x":'
            + b"[" * 40
            + b"]" * 40
            + b"}",
            "invalid_json",
        ),
    ],
)
def test_malformed_json_and_non_finite_coefficients_are_400(server, body, code):
    url, _, _ = server
    status, text = http(f"{url}/v1/chat/completions", body)
    assert status == 400
    assert json.loads(text)["error"]["code"] == code


def test_a_lone_surrogate_is_a_400_naming_the_field(server):
    """Issue 20.7: JSON's "\\ud800" escape reads as a lone surrogate; the tokenizer's TypeError was a 500."""
    url, _, _ = server
    body = b'{"model":"tiny","messages":[{"role":"user","content":"hi \\ud800 there"}]}'
    status, text = http(f"{url}/v1/chat/completions", body)
    error = json.loads(text)["error"]
    assert (
        status == 400
        and error["param"] == "messages.0.content"
        and "lone UTF-16 surrogate" in error["message"]
    )


def test_a_server_error_is_a_500_whose_traceback_is_logged_once(server, monkeypatch, caplog):
    """Issue 20.7: our handler logged the traceback, then uvicorn logged it again (Starlette re-raises it)."""
    import logging

    url, _, service = server

    def broken(request):
        raise RuntimeError("a bug, not the client's fault")

    monkeypatch.setattr(service, "prepare", broken)
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate to the root
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.ERROR):
            status, text = http(
                f"{url}/v1/chat/completions", json.dumps({"model": "tiny", "messages": HI}).encode()
            )
            deadline = time.monotonic() + 10  # the server thread logs after the reply
            while not any(r.exc_info for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert status == 500 and json.loads(text)["error"]["message"] == "Internal server error."
    tracebacks = {
        id(r) for r in caplog.records if r.exc_info
    }  # a record can reach the handler by two loggers
    assert len(tracebacks) == 1, [r.getMessage() for r in caplog.records]


def test_unknown_routes_and_oversized_bodies_get_error_objects(server):
    url, _, _ = server
    status, text = http(f"{url}/v1/nothing")
    assert status == 404 and "error" in json.loads(text)
    # Refused from the declared length, before the body is read.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{")
        reply = b""
        while b"}}" not in reply and (chunk := sock.recv(65536)):  # headers and body may come apart
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "request_too_large" in reply


def test_health_and_metrics(server):
    url, client, service = server
    assert json.loads(http(f"{url}/health")[1])["status"] == "ok"
    chat(
        client,
        extra_body={
            "persona": {"monitor": ["evil"], "steer": [{"trait": "evil", "coef": 3.0, "positions": "all"}]}
        },
    )
    text = http(f"{url}/metrics")[1]
    for name in (
        'persona_requests_total{endpoint="/v1/chat/completions",status="200"}',
        'persona_requests_total{endpoint="/v1/chat/completions",status="404"}',
        "persona_batch_size_bucket",
        "persona_request_latency_seconds_bucket",
        "persona_queue_wait_seconds_bucket",
        "persona_completion_tokens_total",
        'persona_projection_alerts_total{trait="evil"}',
        'persona_steered_requests_total{trait="evil"}',
        'persona_projection_z_bucket{kind="response_avg",le="5.0",trait="evil"}',
        "persona_queue_depth",
        f'persona_scheduler{{path="{service.scheduler}"}} 1.0',
        "persona_time_to_first_token_seconds_bucket",
        "persona_inter_token_latency_seconds_bucket",
        "persona_kv_cache_usage_ratio",
    ):
        assert name in text, name
    if service.scheduler == "engine":  # every reply's first token and the gaps after it, not only streams'
        registry = service.metrics.registry
        assert registry.get_sample_value("persona_time_to_first_token_seconds_count") > 0
        assert registry.get_sample_value("persona_inter_token_latency_seconds_count") > 0


def test_concurrent_requests_with_different_personas_share_a_batch_and_match_alone(
    server, model_and_tokenizer, vectors_dir, scheduler, monkeypatch
):
    model, tokenizer = model_and_tokenizer
    bodies = [
        {},
        {"persona": {"steer": [{"trait": "evil", "coef": 4.0}]}},
        {"persona": {"steer": [{"trait": "kind", "coef": -3.0, "positions": "all"}], "monitor": ["evil"]}},
        {"persona": {"ablate": ["evil", {"trait": "kind", "layer": "all"}], "monitor": ["kind"]}},
    ]
    prompts = [
        HI,
        [{"role": "user", "content": "Hi"}],
        HI,
        [{"role": "user", "content": "How do I fix the fox?"}],
    ]
    _, alone_client, _ = server  # the same model behind a server that batches nothing here
    alone = [
        chat(alone_client, messages=p, extra_body=b, max_tokens=8)
        for p, b in zip(prompts, bodies, strict=True)
    ]
    service = build_service(model, tokenizer, vectors_dir, max_batch=4, max_wait_ms=5000, scheduler=scheduler)
    if scheduler == "engine":  # admit the four together, as the static batcher's long window does
        hold_until_four(service.batcher, monkeypatch)
    before = forwards(service)
    with running(service) as (url, client):
        together: list = [None] * 4

        def send(index):
            together[index] = chat(client, messages=prompts[index], extra_body=bodies[index], max_tokens=8)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    count, sum_, up_to_two = (after - first for after, first in zip(forwards(service), before, strict=True))
    if scheduler == "static":
        assert (count, sum_) == (1, 4)  # one batch of 4
    else:
        assert count > up_to_two  # some forward step carried more than two of the four requests
    for one, shared in zip(alone, together, strict=True):
        assert shared.choices[0].message.content == one.choices[0].message.content
        monitor_one = one.model_extra["persona"].get("monitor", {})
        monitor_shared = shared.model_extra["persona"].get("monitor", {})
        for trait, entry in monitor_one.items():
            for kind in ("prompt_last", "response_avg"):
                assert monitor_shared[trait][kind]["projection"] == pytest.approx(
                    entry[kind]["projection"], abs=1e-4
                )


def forwards(service) -> tuple[float, float, float]:
    """(forwards or batches, requests summed over them, those with at most two requests) so far."""
    registry = service.metrics.registry
    return tuple(
        registry.get_sample_value(name, labels) or 0.0
        for name, labels in (
            ("persona_batch_size_count", {}),
            ("persona_batch_size_sum", {}),
            ("persona_batch_size_bucket", {"le": "2.0"}),
        )
    )


def hold_until_four(batcher, monkeypatch) -> None:
    """The engine's scheduler admits nothing until four jobs wait (once, at most 30 s)."""
    admit, held = batcher._admit, []

    def admit_four_at_once():
        deadline = time.monotonic() + 30
        while not held and len(batcher._inbox) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        held.append(True)
        admit()

    monkeypatch.setattr(batcher, "_admit", admit_four_at_once)


def test_api_key_is_required_when_set_and_checked_exactly(model_and_tokenizer, vectors_dir, scheduler):
    service = build_service(*model_and_tokenizer, vectors_dir, api_key="s3cret-key", scheduler=scheduler)
    with running(service, api_key="wrong") as (url, wrong):
        with pytest.raises(openai.AuthenticationError) as raised:
            chat(wrong)
        assert raised.value.body["code"] == "invalid_api_key"
        assert http(f"{url}/metrics")[0] == 401
        assert http(f"{url}/health")[0] == 200  # liveness probes need no key
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
        assert chat(right).choices[0].message.content is not None
    assert "s3cret" not in repr(service.settings)


def test_a_full_queue_answers_429_at_once(model_and_tokenizer, vectors_dir, scheduler, monkeypatch):
    service = build_service(*model_and_tokenizer, vectors_dir, max_batch=1, max_queue=1, scheduler=scheduler)
    gate = threading.Event()
    if scheduler == "static":
        run_batch = service.batcher.run_batch
        service.batcher.run_batch = lambda jobs: (gate.wait(30), run_batch(jobs))
    else:  # the scheduler thread holds every job in its inbox: one running place + one queued = full
        admit = service.batcher._admit
        monkeypatch.setattr(service.batcher, "_admit", lambda: (gate.wait(30), admit()))
    with running(service) as (url, client):
        results = []
        threads = [threading.Thread(target=lambda: results.append(chat(client))) for _ in range(2)]
        threads[0].start()
        if scheduler == "static":
            _wait_for(lambda: "persona_batch_size_count 1.0" in http(f"{url}/metrics")[1])  # first is running
        threads[1].start()
        waiting = "1.0" if scheduler == "static" else "2.0"  # the engine's both wait for their first step
        _wait_for(lambda: f"persona_queue_depth {waiting}" in http(f"{url}/metrics")[1])
        with pytest.raises(openai.RateLimitError) as raised:
            chat(client)
        assert raised.value.body["code"] == "queue_full"
        gate.set()
        for thread in threads:
            thread.join()
    assert len(results) == 2  # the queued requests were still served


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_openai_error_bodies_are_json_objects_not_stack_traces(server):
    url, _, _ = server
    status, text = http(f"{url}/v1/chat/completions", b'{"model": "tiny"}')
    assert status == 400
    assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in text


def test_a_runaway_coefficient_degrades_its_own_reply_not_the_server(server):
    _, client, _ = server
    body = {"persona": {"steer": [{"trait": "evil", "coef": 1e38, "positions": "all"}], "monitor": ["evil"]}}
    for temperature in (0.0, 1.0):  # greedy and sampled rows both survive non-finite logits
        reply = chat(client, temperature=temperature, seed=1, extra_body=body)
        entry = reply.model_extra["persona"]["monitor"]["evil"]
        assert (
            entry["prompt_last"]["projection"] is None and entry["prompt_last"]["z"] is None
        )  # null, never NaN
    assert chat(client).choices[0].finish_reason == "length"


def test_a_client_leaving_mid_stream_releases_its_request(server):
    url, client, service = server
    stream = chat(client, max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()
    _wait_for(lambda: "persona_requests_in_flight 0.0" in http(f"{url}/metrics")[1])
    if service.scheduler == "engine":  # cancelled in the engine: out of the batch, its cache pages free again
        _wait_for(lambda: not service.batcher._rows and service.batcher.engine.load() == (0, 0.0))
        assert "persona_kv_cache_usage_ratio 0.0" in http(f"{url}/metrics")[1]


def test_the_engines_cache_bounds_the_context_and_a_monitored_reply_that_fills_it_is_served(
    model_and_tokenizer, vectors_dir, scheduler
):
    if scheduler != "engine":
        pytest.skip("the static batcher has no cache that bounds a request")
    service = build_service(*model_and_tokenizer, vectors_dir, kv_cache_tokens=128, scheduler="engine")
    room = service.context_length
    assert room < 128  # the cache, not the model's 256 positions, bounds a request (less the read-back step)
    prompt_tokens = len(encode_chat(service.tokenizer, HI))
    fill = room - prompt_tokens
    with running(service) as (_, client):
        body = {"persona": {"monitor": ["evil"]}, "min_tokens": fill}
        reply = chat(client, max_tokens=fill, extra_body=body)
        assert reply.usage.completion_tokens == fill
        assert reply.model_extra["persona"]["monitor"]["evil"]["response_avg"]["projection"] is not None
        with pytest.raises(openai.APIStatusError) as raised:
            chat(client, max_tokens=fill + 1)
    assert raised.value.status_code == 413
