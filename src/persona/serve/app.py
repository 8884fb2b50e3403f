"""The ASGI app: OpenAI-compatible routes, API key, OpenAI error objects, server-sent events.

Every error a client can cause comes back as OpenAI's error object with its status (400 bad field or
JSON, 401 key, 404 model/trait, 413 too long, 429 queue full); anything else is a 500 with no stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from persona.serve.engine import GenerationJob
from persona.serve.responses import ReplyHeader, chunk_body, completion_body, sse, usage_chunk_body
from persona.serve.schema import ApiError, ChatCompletionRequest, error_body, parse_chat_request
from persona.serve.service import PersonaService
from persona.serve.tracker import Event, Failed, Finished, TextDelta
from persona.serve.traits import ResolvedPersona

MAX_BODY_BYTES = 4 * 1024 * 1024
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions")


class EventChannel:
    """Events from the model thread to the request's coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put_threadsafe(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self) -> Event:
        return await self.queue.get()


def _endpoint(path: str) -> str:
    """A bounded label set: arbitrary paths must not grow the metrics without limit."""
    return next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")


class GuardMiddleware:
    """API key on /v1 and /metrics (when one is configured), and a request count by endpoint and status."""

    def __init__(self, app, service: PersonaService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint, status = _endpoint(scope["path"]), 500
        key = self.service.settings.api_key

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if key and endpoint != "/health" and not _has_key(scope, key):
                message = "Missing or wrong API key. Fix: send 'Authorization: Bearer <key>'."
                response = JSONResponse(error_body(401, message, code="invalid_api_key"), status_code=401)
                return await response(scope, receive, send_and_note)
            return await self.app(scope, receive, send_and_note)
        finally:
            self.service.metrics.requests.labels(endpoint, str(status)).inc()


def _has_key(scope, key: str) -> bool:
    headers = dict(scope.get("headers") or [])
    given = headers.get(b"authorization", b"").decode("latin-1")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), key.encode())


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"The request body is over {MAX_BODY_BYTES} bytes.", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is over {MAX_BODY_BYTES} bytes.", code="request_too_large")
    return bytes(body)


def create_app(service: PersonaService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        yield
        await service.batcher.close()  # uvicorn has already let the in-flight requests finish

    app = FastAPI(title="persona serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GuardMiddleware, service=service)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.settings.served_model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [service.describe_model()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != service.settings.served_model_name:
            raise ApiError(
                404, f"model {model_id!r} is not served here.", param="model", code="model_not_found"
            )
        return service.describe_model()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        chat = parse_chat_request(await _read_body(request))
        job, resolved = service.prepare(chat)
        channel = EventChannel()
        job.emit = channel.put_threadsafe
        service.submit(job, resolved)
        header = ReplyHeader(service.settings.served_model_name)
        if chat.stream:
            events = _stream(service, job, channel, chat, resolved, header, arrived)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        service.metrics.in_flight.inc()
        try:
            event = await channel.get()
            while isinstance(event, TextDelta):
                event = await channel.get()
        finally:
            job.cancelled = True  # no-op once finished; stops the row if this handler was cancelled
            service.metrics.in_flight.dec()
            service.metrics.latency.labels("false").observe(time.monotonic() - arrived)
        if isinstance(event, Failed):
            raise ApiError(500, event.message, code="generation_failed")
        return JSONResponse(completion_body(header, event, service.persona_reply(resolved, event)))

    return app


async def _stream(
    service: PersonaService,
    job: GenerationJob,
    channel: EventChannel,
    chat: ChatCompletionRequest,
    resolved: ResolvedPersona,
    header: ReplyHeader,
    arrived: float,
):
    service.metrics.in_flight.inc()
    first_content = True
    try:
        yield sse(chunk_body(header, {"role": "assistant", "content": ""}))
        while True:
            event = await channel.get()
            if isinstance(event, TextDelta):
                if first_content and not service.batcher.observes_tokens:  # the engine observes every reply's
                    service.metrics.time_to_first_token.observe(time.monotonic() - arrived)
                first_content = False
                yield sse(chunk_body(header, {"content": event.text}))
            elif isinstance(event, Failed):
                yield sse(error_body(500, event.message, code="generation_failed"))
                break
            elif isinstance(event, Finished):
                persona = service.persona_reply(resolved, event)
                yield sse(chunk_body(header, {}, event.finish_reason, persona=persona))
                if chat.stream_options is not None and chat.stream_options.include_usage:
                    yield sse(usage_chunk_body(header, event))
                break
        yield sse("[DONE]")
    finally:
        job.cancelled = True  # the client left mid-stream: its row stops at the next step
        service.metrics.in_flight.dec()
        service.metrics.latency.labels("true").observe(time.monotonic() - arrived)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises the error after this reply and uvicorn logs its traceback: logging it here too
        # printed every traceback twice.
        return JSONResponse(error_body(500, "Internal server error."), status_code=500)
