"""`persona serve` as a process: the command line, the API key from the environment, graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import openai

from conftest import build_tiny_model
from persona import cli
from persona.generation.engine import core as engine_core
from serve_support import http, write_trait_vectors

KEY = "k-7f3e-never-logged"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_is_a_listed_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "  serve " in capsys.readouterr().out


def test_sigterm_lets_the_request_in_flight_finish_and_exits_cleanly(tiny_model_dirs, tokenizer, tmp_path):
    vectors = write_trait_vectors(tmp_path / "vectors", build_tiny_model("llama", len(tokenizer)))
    port = free_port()
    env = {**os.environ, "PERSONA_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "persona.cli", "serve", "--model", tiny_model_dirs["llama"]]
    command += [
        "--vectors",
        str(vectors),
        "--port",
        str(port),
        "--baseline_max_tokens",
        "4",
        "--max_wait_ms",
        "200",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while _status(f"{url}/health") != 200:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        (model,) = json.loads(http(f"{url}/v1/models", headers={"authorization": f"Bearer {KEY}"})[1])["data"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model=model["id"],
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=200,
            temperature=0,
            stream=True,
            extra_body={"persona": {"monitor": ["evil"]}},
        )
        first = next(iter(stream))  # sent before the batch starts: the reply is in flight
        server.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant"
        final = [c for c in rest if c.choices and c.choices[0].finish_reason]
        assert (
            final
            and final[0].choices[0].finish_reason == "length"
            and "monitor" in final[0].model_extra["persona"]
        )
        # uvicorn re-raises the signal once it has shut down, so the exit status is the signal's.
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
    log = server.stdout.read()
    assert "Waiting for connections to close" in log  # the signal came while the reply was in flight
    assert "Application shutdown complete" in log
    assert "API key required" in log and KEY not in log
    engine_runs = engine_core.unavailable(build_tiny_model("llama", len(tokenizer))) is None
    assert ("scheduling: the continuous-batching engine" in log) == engine_runs  # which path, and why
    assert ("scheduling: the static batcher" in log) != engine_runs
    assert _status(f"{url}/health") is None  # gone


def _status(url: str) -> int | None:
    try:
        return http(url)[0]
    except OSError:
        return None


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    """Issue 20.7: found only after the model loaded and the baseline ran (exit 3 with uvicorn's message)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model that does not exist: were it loaded first, its error would come, not the port's.
        command = [
            sys.executable,
            "-m",
            "persona.cli",
            "serve",
            "--model",
            str(tmp_path / "no_model"),
            "--port",
            str(port),
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env={**os.environ, "PERSONA_DEBUG": ""}
        )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"persona serve: error: --port {port}: cannot listen on 127.0.0.1:{port}"), (
        lines[0]
    )
    assert "Fix: choose another --port" in lines[0]


def test_bare_serve_finds_the_shipped_vectors_from_any_directory(tmp_path, monkeypatch):
    """Issue 20.8: the default --vectors persona_vectors/smollm2-135m was read relative to the working directory."""
    from pathlib import Path

    from persona.vectors import vectors_to_read

    monkeypatch.chdir(tmp_path)
    shipped = vectors_to_read("smollm2-135m")
    assert shipped.is_absolute() and (shipped / "evil_response_avg_diff.pt").is_file()
    assert shipped == Path(cli.__file__).resolve().parents[2] / "persona_vectors" / "smollm2-135m"
    (tmp_path / "persona_vectors" / "smollm2-135m").mkdir(
        parents=True
    )  # vectors you extracted here come first
    assert vectors_to_read("smollm2-135m") == Path("persona_vectors") / "smollm2-135m"
