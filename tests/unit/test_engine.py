"""The continuous-batching engine (#23): each request of a mixed packed batch equals that request run alone.

References are independent of the engine: ``persona.steering.steer`` around a batch-of-one ``model.generate``
(greedy, or the static server's ``RowSampler`` for a seeded sampled request), and ``output_hidden_states`` for the
read-outs. The pins at the end name every transformers internal the engine reads, so an upgrade that moves one
fails here first.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
from transformers import LogitsProcessorList

from conftest import ARCHITECTURES, build_tiny_model
from persona.generation.engine import Engine, EngineConfig, EngineRequest, PlanError
from persona.generation.engine import core as engine_core
from persona.generation.sampling import sample_token
from persona.hooks.operators import orthonormalize
from persona.hooks.phase import PhaseError
from persona.steering import AblationSpec, CapSpec, Gate, RowInterventions, SteeringSpec, steer

_TRANSFORMERS = tuple(int(part) for part in __import__("transformers").__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(
    _TRANSFORMERS < engine_core.MIN_TRANSFORMERS,
    reason="the continuous-batching engine needs transformers >= 5.24 (the static path covers older ones)",
)

SUPPORTED = tuple(arch for arch in ARCHITECTURES if arch not in engine_core.UNSUPPORTED)
HIDDEN = 32
# Push size as a multiple of the mean residual norm. The tiny random Gemma repeats one token by a wide logit
# margin (its embeddings are scaled by sqrt(hidden) and tied to the head), so it needs a stronger push before
# steering changes a reply at all.
PUSH = {"gemma": 5.0}


def unit(seed: int) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def prompt(length: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist()


def residual_norm(model, vocab: int) -> float:
    with torch.no_grad():
        states = model(torch.tensor([prompt(20, 0, vocab)]), output_hidden_states=True).hidden_states
    return float(torch.stack([h.norm(dim=-1).mean() for h in states[1:-1]]).mean())


def config(**overrides) -> EngineConfig:
    base = dict(num_blocks=32, page_size=16, max_batch_tokens=16, max_requests_per_batch=8)
    return EngineConfig(**{**base, **overrides})


def cases(c: float, vocab: int) -> list[dict]:
    """Arrival step, prompt, reply length and what applies: every position mode, several entries at one layer,
    layer 0, an ablation mapping plus steering, a cap, a 40-token prompt (chunks of 16), monitoring, a stop
    token (early finish) and seeded sampling."""
    d = [unit(i) for i in range(12)]
    basis = orthonormalize(torch.stack([d[6], d[7]]))
    return [
        dict(arrive=0, prompt=prompt(12, 1, vocab), new=10, specs=[SteeringSpec(1, d[0], c)]),
        dict(
            arrive=0, prompt=prompt(7, 2, vocab), new=8, specs=[SteeringSpec(2, d[1], c, positions="prompt")]
        ),
        dict(arrive=0, prompt=prompt(9, 3, vocab), new=12, specs=[], stop_from_reference=3),
        dict(
            arrive=0,
            prompt=prompt(15, 4, vocab),
            new=12,
            specs=[
                SteeringSpec(1, d[2], c, positions="generated"),
                SteeringSpec(1, d[3], 0.5 * c, positions="all"),
                SteeringSpec(3, d[4], c),
            ],
        ),
        dict(
            arrive=3,
            prompt=prompt(6, 5, vocab),
            new=10,
            specs=[SteeringSpec(2, d[5], c), CapSpec(2, d[8], lo=-0.1, hi=0.1, positions="response")],
            ablations={2: basis},
        ),
        dict(arrive=3, prompt=prompt(40, 6, vocab), new=6, specs=[SteeringSpec(1, d[9], c)]),
        dict(
            arrive=6,
            prompt=prompt(10, 7, vocab),
            new=8,
            specs=[SteeringSpec(1, d[10], c, positions="all"), SteeringSpec(0, d[0], c)],
            monitor={2: torch.stack([d[1], d[2]])},
        ),
        dict(
            arrive=6, prompt=prompt(8, 8, vocab), new=10, specs=[SteeringSpec(2, d[3], c)], sample=(0.9, 123)
        ),
    ]


def reference(model, case: dict, vocab: int) -> tuple[list[int], dict, list[int]]:
    """The request alone: steer() around a batch-of-one generate; read-outs from output_hidden_states."""
    from persona.serve.sampling import RowSampler, SamplingParams

    ids = torch.tensor([case["prompt"]])
    specs = [AblationSpec(layer, basis) for layer, basis in case.get("ablations", {}).items()] + case["specs"]
    kwargs = dict(max_new_tokens=case["new"], do_sample=False, pad_token_id=0, eos_token_id=case.get("stop"))
    if "sample" in case:
        params = SamplingParams(temperature=case["sample"][0], seed=case["sample"][1])
        kwargs["logits_processor"] = LogitsProcessorList([RowSampler([params], ids.shape[1], [], "cpu")])
    with torch.no_grad(), steer(model, specs):
        out = model.generate(ids, output_hidden_states=True, return_dict_in_generate=True, **kwargs)
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    readings = {}
    for layer, directions in case.get("monitor", {}).items():
        states = torch.cat([step[layer][0] for step in out.hidden_states], dim=0)  # prompt + reply[:-1]
        readings[layer] = states.float() @ directions.T
    with torch.no_grad():
        kwargs.pop("logits_processor", None)
        plain = model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
    return tokens, readings, plain


def engine_request(case: dict) -> EngineRequest:
    temperature, seed = case.get("sample", (0.0, None))
    return EngineRequest(
        case["prompt"],
        case["new"],
        RowInterventions(case["specs"], case.get("ablations", {})),
        monitor=case.get("monitor", {}),
        temperature=temperature,
        seed=seed,
        stop_token_ids=[case["stop"]] if "stop" in case else (),
    )


def run_staggered(engine: Engine, all_cases: list[dict], timeout: float = 300) -> dict:
    """Submit each case once the engine has run ``arrive`` forwards; collect every result."""
    pending = sorted(range(len(all_cases)), key=lambda i: all_cases[i]["arrive"])
    ids, results, start = {}, {}, time.monotonic()
    while len(results) < len(all_cases):
        assert time.monotonic() - start < timeout, "the engine did not finish"
        while pending and engine.steps >= all_cases[pending[0]]["arrive"]:
            index = pending.pop(0)
            ids[engine.submit(engine_request(all_cases[index]))] = index
        for request_id in engine.poll(0.01):
            results[ids[request_id]] = engine.result(request_id)
    return results


def prepared_cases(model, vocab: int) -> list[dict]:
    push = PUSH.get(model.config.model_type, 0.6)
    all_cases = cases(push * residual_norm(model, vocab), vocab)
    for case in all_cases:
        if "stop_from_reference" in case:
            with torch.no_grad():
                full = model.generate(
                    torch.tensor([case["prompt"]]),
                    max_new_tokens=case["new"],
                    do_sample=False,
                    pad_token_id=0,
                )
            case["stop"] = full[0, len(case["prompt"]) + case["stop_from_reference"]].item()
    return all_cases


@pytest.mark.parametrize("arch", SUPPORTED)
def test_each_request_of_a_mixed_packed_batch_equals_it_alone(arch, tokenizer, monkeypatch):
    torch.set_num_threads(1)
    model = build_tiny_model(arch, len(tokenizer))
    vocab = len(tokenizer)
    all_cases = prepared_cases(model, vocab)
    seen = spy_segments(monkeypatch)
    with Engine(model, config()) as engine:
        results = run_staggered(engine, all_cases)
        assert engine.restarts == 0
    mixed_forwards = [
        step
        for step in seen
        if any(s.first >= s.prompt_len for s, _ in step) and any(s.first < s.prompt_len for s, _ in step)
    ]
    assert mixed_forwards, "some forward must pack a decoding request with another one's prefill"
    differs = 0
    for index, case in enumerate(all_cases):
        tokens, readings, plain = reference(model, case, vocab)
        got = results[index]
        assert got.status == "finished", got.error
        assert got.tokens == tokens, f"{arch} request {index}"
        differs += bool(case["specs"]) and tokens != plain
        for layer, expected in readings.items():
            assert got.readings[layer].shape == expected.shape
            torch.testing.assert_close(got.readings[layer], expected, atol=1e-4, rtol=1e-4)
    assert differs >= 4, "the pushes must change most steered replies, or the comparison proves little"
    stop_case = next(case for case in all_cases if "stop" in case)
    assert len(results[all_cases.index(stop_case)].tokens) < stop_case["new"]  # the early finish happened


def test_seeded_sampling_does_not_depend_on_batch_mates(tokenizer):
    torch.set_num_threads(1)
    model = build_tiny_model("llama", len(tokenizer))
    vocab = len(tokenizer)
    all_cases = prepared_cases(model, vocab)
    sampled = next(case for case in all_cases if "sample" in case)
    with Engine(model, config()) as engine:
        mixed = run_staggered(engine, all_cases)[all_cases.index(sampled)].tokens
        alone = engine.result(engine.submit(engine_request(sampled)), timeout=120).tokens
        other_seed = engine_request(sampled)
        other_seed.seed = 124
        different = engine.result(engine.submit(other_seed), timeout=120).tokens
    assert mixed == alone
    assert different != alone  # the seed matters, so equality above is not a greedy reply in disguise


def gate_reading(model, ids: list[int], layer: int, direction: torch.Tensor) -> float:
    """The gate's input computed independently: the last prompt token at ``layer`` (no hooks), on the unit direction."""
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1]
    return float(hidden.double() @ direction.double())


def gated_cases(model, vocab: int) -> list[dict]:
    """Gates that fire and gates that do not (thresholds just past each prompt's own reading), on the entry's
    layer and below it, on a steer (``all`` and ``response``), a cap and an ablation; a 40-token prompt whose
    gate is read in its third chunk; the gates read before that layer's ablation mapping."""
    c = PUSH.get(model.config.model_type, 0.6) * residual_norm(model, vocab)
    d = [unit(20 + i) for i in range(6)]
    found = []
    for number, (length, layer, fires) in enumerate(
        [(12, 1, True), (9, 2, False), (40, 1, True), (7, 2, True)]
    ):
        ids = prompt(length, 30 + number, vocab)
        reading = gate_reading(model, ids, layer, d[0])
        margin = 1e-3 * (1 + abs(reading))
        gate = (
            Gate(layer, d[0], above=reading - margin) if fires else Gate(layer, d[0], above=reading + margin)
        )
        found.append(dict(arrive=0, prompt=ids, new=8, fires=fires, gate=gate))
    found[0]["specs"] = [SteeringSpec(2, d[1], c, positions="all", when=found[0].pop("gate"))]
    found[1]["specs"] = [SteeringSpec(2, d[2], c, positions="all", when=found[1].pop("gate"))]
    found[2]["specs"] = [SteeringSpec(2, d[3], c, when=found[2].pop("gate")), SteeringSpec(1, d[4], c)]
    found[3]["specs"] = [AblationSpec(2, d[5], when=found[3].pop("gate")), CapSpec(2, d[1], lo=-0.1, hi=0.1)]
    found[3]["ablations"] = {2: d[4][None]}
    return found


def test_gated_entries_decide_once_from_the_last_prompt_token_and_equal_steer_alone(tokenizer):
    torch.set_num_threads(1)
    model = build_tiny_model("llama", len(tokenizer))
    vocab = len(tokenizer)
    all_cases = gated_cases(model, vocab)
    with Engine(model, config()) as engine:
        results = run_staggered(engine, all_cases)
    for index, case in enumerate(all_cases):
        tokens, _, plain = reference(model, case, vocab)
        assert results[index].status == "finished", results[index].error
        assert results[index].tokens == tokens, index
        assert results[index].fired == {0: case["fires"]}, index
        if index in (0, 1):  # a lone gated steer: steered when it fires, exactly plain when it does not
            assert (tokens != plain) == case["fires"], index


def test_a_gate_that_cannot_be_read_in_time_fails_its_request_with_the_fix(tokenizer):
    """Two gated ``all`` entries, the lower one under the higher one's gate: the probe that reads the higher gate
    must apply the lower entry to a prompt chunk before its own gate is read. It fails, it never guesses."""
    model = build_tiny_model("llama", len(tokenizer))
    specs = [
        SteeringSpec(1, unit(0), 1.0, positions="all", when=Gate(1, unit(1), above=-1e9)),
        SteeringSpec(2, unit(2), 1.0, positions="all", when=Gate(2, unit(3), above=-1e9)),
    ]
    with Engine(model, config(max_batch_tokens=16)) as engine:
        long = engine.result(engine.submit(EngineRequest(prompt(40, 1, 300), 2, RowInterventions(specs))), 60)
        short = engine.result(
            engine.submit(EngineRequest(prompt(12, 1, 300), 2, RowInterventions(specs))), 60
        )
    assert long.status == "failed" and "gate probe" in long.error and "Fix: raise" in long.error
    assert short.status == "finished" and short.fired == {0: True, 1: True}


def test_min_new_tokens_holds_the_stop_tokens_off(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    ids = prompt(8, 40, len(tokenizer))
    with torch.no_grad():
        plain = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    stop = plain[0, len(ids) + 1].item()  # the reply's second token ends it
    with torch.no_grad():
        held = model.generate(
            torch.tensor([ids]),
            max_new_tokens=8,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=stop,
        )[0, len(ids) :].tolist()
    with Engine(model, config()) as engine:
        early = engine.result(engine.submit(EngineRequest(ids, 8, stop_token_ids=[stop])), timeout=60)
        late = engine.result(
            engine.submit(EngineRequest(ids, 8, stop_token_ids=[stop], min_new_tokens=5)), timeout=60
        )
    assert len(early.tokens) <= 2
    assert late.tokens == held[: len(late.tokens)] and len(late.tokens) >= 5


def test_a_streamed_request_shows_its_tokens_step_by_step(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    ids = prompt(6, 41, len(tokenizer))
    seen = []
    with Engine(model, config()) as engine:
        request_id = engine.submit(EngineRequest(ids, 12, stream=True))
        while not engine.poll(0.01):
            if engine.partial(request_id) and (not seen or seen[-1] != engine.partial(request_id)):
                seen.append(list(engine.partial(request_id)))
        final = engine.result(request_id).tokens
    assert len(seen) >= 2 and all(final[: len(part)] == part for part in seen)


def test_the_static_server_draws_with_the_engines_sampler():
    """One mechanism: a seeded request's draw is the same function in the engine and in the static server."""
    from persona.serve import sampling as served

    assert served.sample_token is sample_token


def spy_segments(monkeypatch) -> list:
    seen = []
    real = engine_core.scheduled_segments

    def spy(batch):
        segments = real(batch)
        seen.append([(s, len(f.state.initial_tokens)) for s, f in zip(segments, batch, strict=True)])
        return segments

    monkeypatch.setattr(engine_core, "scheduled_segments", spy)
    return seen


def test_chunked_prefill_steers_only_the_last_prompt_token_under_response(tokenizer, monkeypatch):
    model = build_tiny_model("llama", len(tokenizer))
    d = unit(3)
    long_prompt = prompt(40, 9, len(tokenizer))
    seen = spy_segments(monkeypatch)
    readings = []
    with Engine(model, config(max_batch_tokens=16)) as engine:
        for coef in (0.0, 5.0):
            specs = [SteeringSpec(2, d, coef)] if coef else []
            request = EngineRequest(long_prompt, 3, RowInterventions(specs), monitor={2: d[None]})
            readings.append(engine.result(engine.submit(request), timeout=120).readings[2][:, 0])
    chunks = [segment for step in seen[:4] for segment, _ in step]
    assert [(s.first, s.end - s.start) for s in chunks[:3]] == [(0, 16), (16, 16), (32, 8)]
    shift = readings[1] - readings[0]
    assert torch.equal(shift[:39], torch.zeros(39))  # no prompt token but the last one moved
    torch.testing.assert_close(shift[39], torch.tensor(5.0))


def test_a_full_cache_soft_resets_and_still_steers_exactly(tokenizer, monkeypatch):
    model = build_tiny_model("llama", len(tokenizer))
    vocab = len(tokenizer)
    all_cases = prepared_cases(model, vocab)
    seen = spy_segments(monkeypatch)
    with Engine(model, config(num_blocks=4)) as engine:
        results = run_staggered(engine, all_cases)
    resets = {s.request_id for step in seen for s, prefill in step if s.prompt_len != prefill}
    assert resets, "num_blocks=4 should force the scheduler to evict and re-prefill a request"
    for index, case in enumerate(all_cases):
        assert results[index].tokens == reference(model, case, vocab)[0], f"request {index}"


def test_cancel_frees_the_request_and_the_others_carry_on(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    vocab = len(tokenizer)
    short = dict(prompt=prompt(6, 11, vocab), new=6, specs=[SteeringSpec(1, unit(1), 3.0)])
    with Engine(model, config(num_blocks=128, page_size=4)) as engine:
        pool = engine._manager.batch_processor.cache.pool
        long_id = engine.submit(EngineRequest(prompt(8, 12, vocab), 200))
        while engine.steps < 12:
            time.sleep(0.01)
        short_id = engine.submit(engine_request(short))
        held = pool.num_free_sectors
        engine.cancel(long_id)
        assert engine.result(long_id).status == "cancelled"
        assert engine.result(short_id, timeout=120).tokens == reference(model, short, vocab)[0]
        deadline = time.monotonic() + 5
        while (
            pool.num_free_sectors <= held and time.monotonic() < deadline
        ):  # freed at the manager's next turn
            time.sleep(0.05)
        assert pool.num_free_sectors > held  # the cancelled request's pages are back


def test_a_request_larger_than_the_cache_is_refused_when_submitted(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    with Engine(model, config(num_blocks=2, page_size=16)) as engine:
        with pytest.raises(ValueError, match="EngineConfig.num_blocks"):
            engine.submit(EngineRequest(list(range(1, 30)), 8))
        assert engine.result(engine.submit(EngineRequest([1, 5, 6], 4)), timeout=60).status == "finished"


def test_a_failing_forward_fails_every_request_in_flight_and_the_engine_restarts(tokenizer, monkeypatch):
    model = build_tiny_model("llama", len(tokenizer))
    calls = []
    real = engine_core.check_segments

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise PlanError("injected disagreement")
        return real(*args)

    monkeypatch.setattr(engine_core, "check_segments", broken_once)
    with Engine(model, config()) as engine:
        ids = [engine.submit(EngineRequest([1, 5, 6, 7], 20)) for _ in range(3)]
        reported = set()
        deadline = time.monotonic() + 60
        while not set(ids) <= reported and time.monotonic() < deadline:
            reported.update(engine.poll(0.05))  # poll() names the requests the restart failed, too
        assert set(ids) <= reported
        results = [engine.result(request_id, timeout=60) for request_id in ids]
        assert {r.status for r in results} == {"failed"}
        assert all("injected disagreement" in r.error for r in results)
        assert engine.result(engine.submit(EngineRequest([1, 5, 6], 4)), timeout=60).status == "finished"
        assert engine.restarts == 1


def test_refusals_name_the_field_and_the_fix(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match="num_blocks"):
        EngineConfig(num_blocks=0)
    with pytest.raises(ValueError, match="gpt_neox"):
        Engine(build_tiny_model("gpt_neox", len(tokenizer)), config())
    with Engine(model, config()) as engine, pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(EngineRequest([1, 5], 0))


@pytest.mark.parametrize("positions", ["response", "generated", "all"])
def test_steer_refuses_a_continuous_batching_forward(tokenizer, positions):
    """Before the refusal, `generated` silently never steered and `response` crashed every request."""
    from transformers import GenerationConfig

    model = build_tiny_model("llama", len(tokenizer))
    with steer(model, [SteeringSpec(1, unit(0), 2.0, positions=positions)]):
        out = model.generate_batch(
            [[1, 5, 6, 7]],
            generation_config=GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1),
            continuous_batching_config=engine_core.cb_config(config()),
        )
    (result,) = out.values()
    assert result.error is not None and "persona.generation.engine.Engine" in result.error
    assert PhaseError.__name__ in result.error or "packs several requests" in result.error


def test_transformers_internals_the_engine_reads(tokenizer):
    """Every transformers internal the engine reads or replaces, by name. The per-forward cross-check
    (``position_offset`` already advanced by ``query_length`` at hook time, ``requests_in_batch`` in the order of
    ``cu_seq_lens_q``, ``has_new_token`` iff the chunk ends the prefill) runs in every engine test above and
    raises :class:`PlanError` on a mismatch; the soft-reset test pins ``_true_initial_tokens``."""
    import dataclasses
    import inspect

    from transformers.generation.continuous_batching import continuous_api, model_runner, requests
    from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs

    fields = {f.name for f in dataclasses.fields(requests.RequestState)}
    assert {"request_id", "initial_tokens", "position_offset", "_true_initial_tokens"} <= fields
    assert {"state", "query_length", "has_new_token"} <= set(
        inspect.signature(requests.FutureRequestState).parameters
    )
    assert "requests_in_batch" in inspect.getsource(ContinuousBatchingIOs.__init__)
    assert "self._sample(scores, output_ids)" in inspect.getsource(model_runner.ModelRunner)
    assert callable(model_runner.infer_max_single_request_tokens)
    manager_api = continuous_api.ContinuousBatchingManager
    for name in ("warmup", "start", "stop", "destroy", "cancel_request", "get_result"):
        assert callable(getattr(manager_api, name)), name
    assert "eos_token_id" in inspect.signature(manager_api.add_request).parameters
    cb = engine_core.cb_config(config(num_blocks=7))
    assert (cb.num_blocks, cb.allow_block_sharing, cb.use_cuda_graph) == (
        7,
        False,
        False,
    )  # never sized from RAM

    model = build_tiny_model("llama", len(tokenizer))
    model.set_attn_implementation("eager")
    with Engine(model, config()) as engine:
        manager = engine._manager
        assert model.config._attn_implementation == "paged|eager"  # CB's switch, undone on stop
        processor = manager.batch_processor  # created by warmup(), before start()
        assert processor.cache.use_prefix_sharing is False
        assert isinstance(processor.inputs_and_outputs.requests_in_batch, list)
        assert processor.model_runner.__dict__["_sample"] is not None  # the instance override is in place
        assert manager.background_thread_status.fatal_error is None
        assert engine._thread is manager._generation_thread and engine._thread.is_alive()  # whose forwards
        assert manager.output_router.output_queue.empty()
        assert processor.cache.pool.num_free_sectors == config().num_blocks
        for allocator in processor.cache.cache_allocators.values():  # Engine.load(): pages held per request
            assert allocator.block_table == {} and allocator.num_blocks == config().num_blocks
        assert isinstance(processor.scheduler.waiting_requests, dict) and manager.input_queue.qsize() == 0
        request_id = engine.submit(EngineRequest(list(range(1, 40)), 30, stream=True))
        while len(engine.partial(request_id)) < 2:
            engine.poll(0.01)
        assert engine.load()[1] == 3 / config().num_blocks  # 41 tokens in pages of 16
        engine.cancel(request_id)
    assert model.config._attn_implementation == "eager"


def test_gpt_neox_still_disagrees_with_generate_under_continuous_batching(tokenizer):
    """Why gpt_neox is in UNSUPPORTED. When this fails, transformers fixed it: drop it from the list."""
    from transformers import GenerationConfig

    model = build_tiny_model("gpt_neox", len(tokenizer))
    prompts = [prompt(5, 1, len(tokenizer)), prompt(3, 2, len(tokenizer))]
    out = model.generate_batch(
        prompts,
        generation_config=GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1),
        continuous_batching_config=engine_core.cb_config(config()),
    )
    replies = [result.generated_tokens for _, result in sorted(out.items())]
    alone = [
        model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        for p in prompts
    ]
    assert replies != alone


def test_find_packed_reads_a_continuous_batching_forward_and_nothing_else():
    from persona.hooks.phase import PackedForward, find_packed

    cu, positions = torch.tensor([0, 1, 6]), torch.tensor([[41, 0, 1, 2, 3, 4]])
    assert find_packed({"cu_seq_lens_q": cu, "position_ids": positions}) == PackedForward(cu, positions)
    assert find_packed({"attention_mask": torch.ones(1, 4), "position_ids": positions}) is None

    class PagedAttentionCache:  # the class name is what find_packed recognises
        pass

    with pytest.raises(PhaseError, match="cu_seq_lens_q"):
        find_packed({"cache": PagedAttentionCache()})


@pytest.mark.parametrize(
    ("version", "refused"), [("4.56.2", True), ("5.23.0", True), ("5.24.0", False), ("6.0", False)]
)
def test_an_older_transformers_is_refused_in_one_line(version, refused):
    if not refused:
        engine_core.check_transformers(version)
        return
    with pytest.raises(
        RuntimeError, match=rf"needs transformers >= 5\.24 \(found {re.escape(version)}\)\. Fix:"
    ):
        engine_core.check_transformers(version)
