"""A small OpenAI-compatible chat server on loopback for tests: logprobs, failures, delays, concurrency."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChatServer:
    def __init__(self):
        self.top_logprobs: dict[str, dict[str, float]] = {}  # prompt -> token -> probability
        self.scorer = None  # prompt -> token probabilities, for prompts not in top_logprobs
        self.completions: dict[str, str] = {}  # prompt -> text of a max_tokens>1 call
        self.failures: list[str] = []  # "500" | "429" | "401" | "hang", consumed one per call
        self.delay = 0.0
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[tuple[dict, dict]] = []  # (lower-cased headers, body)
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()  # let hanging handlers go
        self._httpd.shutdown()
        self._httpd.server_close()

    def respond(self, body: dict) -> dict:
        prompt = body["messages"][0]["content"]
        if body.get("logprobs"):
            probs = self.top_logprobs[prompt] if prompt in self.top_logprobs else self.scorer(prompt)
            top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in probs.items()]
            logprobs = {
                "content": [{**max(top, key=lambda x: x["logprob"]), "top_logprobs": top}],
                "refusal": None,
            }
            content = logprobs["content"][0]["token"]
        else:
            logprobs, content = None, self.completions[prompt]
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "length",
                    "logprobs": logprobs,
                }
            ],
        }

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.calls += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    failure = server.failures.pop(0) if server.failures else None
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    if failure == "hang":
                        server.release.wait(5.0)
                        return self._send(200, server.respond(body))
                    if failure in ("500", "429"):
                        return self._send(
                            int(failure),
                            {"error": {"message": "injected", "type": "server_error"}},
                            {"Retry-After": "0"} if failure == "429" else None,
                        )
                    if failure == "401":  # like OpenAI: the error message echoes (part of) the key it got
                        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                        return self._send(
                            401,
                            {
                                "error": {
                                    "message": f"Incorrect API key provided: {key}.",
                                    "type": "invalid_request_error",
                                }
                            },
                        )
                    time.sleep(server.delay)
                    return self._send(200, server.respond(body))
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler
