"""Reply shapes: OpenAI's chat completion, chunk and usage objects, plus our ``persona`` field."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from persona.serve.tracker import Finished


@dataclass(frozen=True)
class ReplyHeader:
    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def fields(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(finished: Finished) -> dict:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def completion_body(header: ReplyHeader, finished: Finished, persona: dict) -> dict:
    return {
        **header.fields("chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": finished.text},
                "finish_reason": finished.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(finished),
        "persona": persona,
    }


def chunk_body(header: ReplyHeader, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {**header.fields("chat.completion.chunk"), "choices": [choice], **extra}


def usage_chunk_body(header: ReplyHeader, finished: Finished) -> dict:
    return {**header.fields("chat.completion.chunk"), "choices": [], "usage": usage(finished)}


def sse(payload: dict | str) -> str:
    """One server-sent event; ``allow_nan=False`` so a stray NaN fails here, not in the client's parser."""
    data = (
        payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n"
