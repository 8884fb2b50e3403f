"""The OpenAI-compatible judge against a real HTTP server on loopback (no mocked client).

``FakeChatServer`` implements ``POST /v1/chat/completions`` with scripted top logprobs per prompt, scripted
short completions for the parsed fallback, and injected failures (500, 429, 401, or hanging past the
client's timeout) for the next calls. It counts calls and the most requests it ever had in flight.
"""

from __future__ import annotations

import logging

import pytest

from fake_openai import FakeChatServer
from persona.judges import FAILED, LOGPROBS, PARSED, REFUSAL, OpenAIJudge, make_judge
from persona.judges.cache import CACHE_FILENAME

SECRET = "sk-test-DO-NOT-LEAK-4f9c2a7e1b"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with FakeChatServer() as s:
        yield s


def fast_judge(server, **kwargs) -> OpenAIJudge:
    options = dict(base_url=server.base_url, timeout=2.0, retry_base_delay=0.01, retry_max_delay=0.05)
    return OpenAIJudge("judge-model", **{**options, **kwargs})


def test_score_is_the_weighted_mean_of_the_first_tokens_top_logprobs(server):
    server.top_logprobs["p"] = {"80": 0.5, "90": 0.3, " The": 0.2}
    [result] = fast_judge(server).score(["p"])
    assert result.method == LOGPROBS
    assert result.score == pytest.approx((80 * 0.5 + 90 * 0.3) / 0.8)
    headers, body = server.requests[0]
    assert body["messages"] == [{"role": "user", "content": "p"}]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("judge-model", 1, 0)
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert headers["authorization"] == f"Bearer {SECRET}"  # the key from the environment is what is sent


def test_results_keep_the_order_of_the_prompts(server):
    prompts = [f"p{i}" for i in range(10)]
    for i, p in enumerate(prompts):
        server.top_logprobs[p] = {str(10 + i * 10): 1.0}
    scores = fast_judge(server, max_concurrency=4).score(prompts)
    assert [s.score for s in scores] == pytest.approx([10 + i * 10 for i in range(10)])


def test_mass_on_refusal_gives_no_score(server):
    server.top_logprobs["refused"] = {"REF": 0.8, "0": 0.1, "100": 0.05}
    server.top_logprobs["rambling"] = {"The": 0.9, "50": 0.1, "10": 0.0001}
    refused, rambling = fast_judge(server).score(["refused", "rambling"])
    assert (refused.score, refused.method) == (None, REFUSAL)
    assert (rambling.score, rambling.method) == (None, LOGPROBS)  # unscorable: under a quarter on numbers


def test_retries_after_a_500_a_429_and_a_timeout_then_succeeds(server):
    server.top_logprobs["p"] = {"40": 1.0}
    server.failures = ["500", "429", "hang"]
    [result] = fast_judge(server, timeout=0.3).score(["p"])
    assert (result.score, result.method) == (40.0, LOGPROBS)
    assert server.calls == 4


def test_a_call_that_finally_fails_is_failed_and_not_cached(server, tmp_path):
    server.top_logprobs["p"] = {"40": 1.0}
    server.failures = ["500"] * 3
    [result] = fast_judge(server, max_retries=2, cache_dir=str(tmp_path)).score(["p"])
    assert (result.score, result.method) == (None, FAILED)
    assert "HTTP 500" in result.error and "3 attempts" in result.error
    assert server.calls == 3
    [again] = fast_judge(server, max_retries=2, cache_dir=str(tmp_path)).score(
        ["p"]
    )  # failures are not cached
    assert (again.score, again.method, server.calls) == (40.0, LOGPROBS, 4)


def test_a_client_error_is_not_retried(server):
    server.failures = ["401"]
    [result] = fast_judge(server).score(["p"])
    assert result.method == FAILED and "HTTP 401" in result.error and "1 attempt)" in result.error
    assert server.calls == 1


def test_a_rerun_with_the_cache_costs_zero_calls(server, tmp_path):
    prompts = ["a", "b", "c"]
    for i, p in enumerate(prompts):
        server.top_logprobs[p] = {str(10 + i): 1.0}
    first = fast_judge(server, cache_dir=str(tmp_path)).score(prompts)
    assert server.calls == 3
    second = fast_judge(server, cache_dir=str(tmp_path)).score(prompts + ["a"])
    assert server.calls == 3
    assert second == first + [first[0]]


def test_no_more_calls_in_flight_than_max_concurrency(server):
    server.delay = 0.1
    prompts = [f"p{i}" for i in range(12)]
    for p in prompts:
        server.top_logprobs[p] = {"5": 1.0, "50": 0.0001}
    fast_judge(server, max_concurrency=3).score(prompts)
    assert server.calls == 12
    assert 2 <= server.max_in_flight <= 3  # concurrent, and bounded


def test_servers_that_split_numbers_fall_back_to_a_parsed_completion(server):
    # A digit-splitting tokenizer: the answer "85" appears in the top logprobs only as "8".
    server.top_logprobs["p"] = {"8": 0.85, "9": 0.1, "7": 0.05}
    server.completions["p"] = "85"
    server.top_logprobs["r"] = {"3": 0.6, "REF": 0.3}
    server.completions["r"] = "REFUSAL"
    parsed, refused = fast_judge(server).score(["p", "r"])
    assert (parsed.score, parsed.method) == (85.0, PARSED)
    assert (refused.score, refused.method) == (None, REFUSAL)
    short_calls = [body for _, body in server.requests if not body.get("logprobs")]
    assert sorted(body["max_tokens"] for body in short_calls) == [4, 4]


def test_the_api_key_never_reaches_the_cache_errors_or_logs(server, tmp_path, caplog):
    server.top_logprobs["ok"] = {"70": 1.0}
    server.failures = ["401"]
    judge = fast_judge(server, cache_dir=str(tmp_path))
    with caplog.at_level(logging.DEBUG):
        failed = judge.score(["bad"])[0]
        judge.score(["ok"])
    assert failed.method == FAILED and "Incorrect API key provided" in failed.error
    assert SECRET not in failed.error and "DO-NOT-LEAK" not in failed.error
    assert SECRET not in caplog.text
    assert SECRET not in repr(judge)
    cache_files = list(tmp_path.iterdir())
    assert any(f.name == CACHE_FILENAME for f in cache_files)
    for f in cache_files:  # the database and its WAL/shm files
        assert SECRET.encode() not in f.read_bytes()


def test_make_judge_routes_specs_and_local_servers_need_no_key(server, monkeypatch):
    judge = make_judge("openai:judge-model", base_url=server.base_url, retry_base_delay=0.01)
    assert isinstance(judge, OpenAIJudge) and judge.name == "openai:judge-model"
    assert (
        make_judge("Qwen/Qwen2.5-7B-Instruct", base_url=server.base_url).name
        == "openai:Qwen/Qwen2.5-7B-Instruct"
    )
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    server.top_logprobs["p"] = {"12": 1.0}
    assert make_judge("openai:judge-model").score(["p"])[0].score == 12.0
    assert server.requests[-1][0]["authorization"] == "Bearer not-needed"
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        make_judge("openai:gpt-4.1-mini")
    with pytest.raises(ValueError, match="base_url"):
        make_judge("local", base_url=server.base_url)
