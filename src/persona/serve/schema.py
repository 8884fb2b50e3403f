"""Request shapes: OpenAI's chat completions API, extended only by the ``persona`` field; OpenAI error objects.

Parsing is strict where a silent default would mislead (our ``persona`` field, unsupported OpenAI
features) and lenient elsewhere (unknown top-level fields other clients send are ignored).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from persona.core.constants import POSITIONS

Positions = Literal["response", "generated", "prompt", "all"]
assert set(Positions.__args__) == set(POSITIONS), "keep in step with persona.steering.POSITIONS"
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_PERSONA_ITEMS = 32  # bounds the hooks one request can attach

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """An error the client caused or must wait out: sent as OpenAI's error object with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


Bound = FiniteFloat | str  # projection units, or a percentile of the trait's sidecar ("p1" .. "p99")


class WhenItem(BaseModel):
    """Make a steer or ablate entry conditional: it applies to this request only when the prompt's last token
    projects on ``trait``'s vector at ``layer`` strictly above ``above`` (or below ``below``)."""

    model_config = ConfigDict(extra="forbid")

    trait: str
    layer: int | None = None  # None: the gated entry's own layer
    above: Bound | None = None
    below: Bound | None = None


class CapItem(BaseModel):
    """Clamp the projection on ``trait``'s vector to ``[lo, hi]`` (neither given: hi = "p99", lo unbounded)."""

    model_config = ConfigDict(extra="forbid")

    trait: str
    layer: int | None = None  # None: the trait's default layer
    lo: Bound | None = None
    hi: Bound | None = None
    positions: Positions = "all"


class SteerItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trait: str
    coef: FiniteFloat | None = None  # raw multiplier of the vector; or
    dose: FiniteFloat | None = (
        None  # |coef|·‖v‖/mean‖h‖ at the layer (signed); neither: the calibrated recommendation
    )
    layer: int | None = None  # None: the recommendation's layer, else the trait's default layer (/v1/models)
    positions: Positions = "response"
    force: bool = False  # steer above the trait's dose limit
    when: WhenItem | None = None  # steer only prompts that pass this gate


class AblateItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trait: str
    layer: int | Literal["all"] | None = None  # None: the trait's default layer; "all": every block's output
    when: WhenItem | None = None  # ablate only for prompts that pass this gate (one layer, not "all")


class PersonaFields(BaseModel):
    """The ``persona`` field of a request (``extra_body={"persona": {...}}`` with the openai client)."""

    model_config = ConfigDict(extra="forbid")

    steer: list[SteerItem] = Field(default_factory=list, max_length=MAX_PERSONA_ITEMS)
    monitor: list[str] = Field(default_factory=list, max_length=MAX_PERSONA_ITEMS)
    ablate: list[str | AblateItem] = Field(default_factory=list, max_length=MAX_PERSONA_ITEMS)
    cap: list[CapItem] = Field(default_factory=list, max_length=MAX_PERSONA_ITEMS)
    orthogonalise: bool = False  # the steer entries at each layer, Gram-Schmidt in the order given


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_chat_turn(self) -> dict[str, str]:
        content = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: FiniteFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end-of-sequence before this many tokens
    persona: PersonaFields | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_sequences(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stops)


# Fields that would change what a client gets back if we ignored them: refused, never silently dropped.
UNSUPPORTED_WHEN_SET = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "audio",
    "prediction",
)


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """Body bytes -> a validated request, or :class:`ApiError` 400 naming the field and the fix."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"The request body is not valid JSON: {error}.", code="invalid_json") from None
    except (
        RecursionError
    ):  # deeper than Python's recursion limit: the parser gives up before MAX_JSON_DEPTH is checked
        raise ApiError(400, _TOO_DEEP, code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    _check_values(data)
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{param}: {first['msg']}.", param=param, code="invalid_value") from None
    _refuse_unsupported(request)
    return request


MAX_JSON_DEPTH = 32  # an OpenAI request nests 5 deep; the rest of the body is a client's mistake or an attack
_TOO_DEEP = f"The request body nests more than {MAX_JSON_DEPTH} levels of arrays and objects. Fix: send a flat request."


def _check_values(data: dict) -> None:
    """Every value of the body: nested at most :data:`MAX_JSON_DEPTH` deep, every string encodable as UTF-8 (JSON's
    ``\\ud800`` escapes give lone surrogates, which a tokenizer refuses with a TypeError)."""
    pending = [((), data)]
    while pending:
        path, value = pending.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise ApiError(400, _TOO_DEEP, code="invalid_json")
        if isinstance(value, dict):
            pending += [((*path, str(key)), item) for key, item in value.items()]
        elif isinstance(value, list):
            pending += [((*path, str(index)), item) for index, item in enumerate(value)]
        elif isinstance(value, str) and not _encodable(value):
            param = ".".join(path)
            raise ApiError(
                400, f"{param}: holds a lone UTF-16 surrogate, which is not text. Fix: send valid Unicode.",
                param=param, code="invalid_value",
            )  # fmt: skip


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    for name in UNSUPPORTED_WHEN_SET:
        value = (request.model_extra or {}).get(name)
        if value not in (None, False, 0, [], {}):
            raise ApiError(400, f"{name} is not supported by persona serve. Fix: leave it out.", param=name)
    if request.n != 1:
        raise ApiError(400, f"n={request.n}: persona serve returns one choice. Fix: send n=1.", param="n")
    stops = request.stop_sequences()
    if len(stops) > MAX_STOP_SEQUENCES or any(not stop for stop in stops):
        raise ApiError(
            400, f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings; got {stops!r}.", param="stop"
        )
