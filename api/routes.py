"""The FastAPI application: /v1/completions, /v1/chat/completions, /v1/models, /health, /version, /metrics,
with OpenAI-shaped errors and an optional API key. Built per Serve replica around an
OpenAIServing; testable with a fake engine. Runs in the Serve ingress."""

from __future__ import annotations

import hmac
import logging
import time

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers

from api.chat import ChatCompletionRequest
from api.protocol import CompletionRequest, error_body, validation_error_body
from api.errors import ENGINE_UNAVAILABLE, RETRY_AFTER_S, APIError
from api.ingress import ScopeBodyMiddleware
from api.serving import OpenAIServing
from api.tokenization import DetokenizeRequest, TokenizeRequest, detokenize, tokenize
from cluster.engine_client import EngineDeadError, RequestFailedError

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
DEFAULT_MAX_BODY_BYTES = 100 << 20


def _error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
           retry_after_s: int | None = None):
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(error_body(message, type=type, param=param, code=status), status_code=status,
                        headers=headers)


class ClosingStreamingResponse(StreamingResponse):
    """Closes its CompletionStream however the response ends. Starlette leaves the body
    unclosed when the task is cancelled inside send(), as a Serve replica's is when the
    proxy loses the client (before the first line, or mid-stream); the engine requests
    would then run on until the garbage collector found the stream."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # nothing in it awaits: done at once


def build_fastapi_app(serving: OpenAIServing, *, api_key: str | None = None,
                      max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="shardserve", version=VERSION)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(ScopeBodyMiddleware)  # outermost: the body is back before any other reads it

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return _error(exc.status, exc.message, type=exc.type, param=exc.param, retry_after_s=exc.retry_after_s)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_request, exc: EngineDeadError):
        # Serve replaces the replica (its health check fails); a retry reaches the new one.
        return _error(503, ENGINE_UNAVAILABLE, type="service_unavailable", retry_after_s=RETRY_AFTER_S)

    @app.exception_handler(RequestFailedError)
    async def request_failed(_request, exc: RequestFailedError):
        # The engine is fine; this request is not (a retry fails the same way): no Retry-After.
        return _error(500, str(exc), type="internal_server_error")

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        logger.exception("unhandled error in a request")
        return _error(500, "internal server error", type="internal_server_error")

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival_time = time.monotonic()
        completion = await _parse_body(request, CompletionRequest, max_body_bytes)
        return _answer(await serving.create_completion(completion, arrival_time), completion.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival_time = time.monotonic()
        chat = await _parse_body(request, ChatCompletionRequest, max_body_bytes)
        return _answer(await serving.create_chat_completion(chat, arrival_time), chat.stream)

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        body = await _parse_body(request, TokenizeRequest, max_body_bytes)
        serving.check_model(body.model)
        return JSONResponse(tokenize(serving.engine, body).model_dump())

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        body = await _parse_body(request, DetokenizeRequest, max_body_bytes)
        serving.check_model(body.model)
        return JSONResponse(detokenize(serving.engine, body).model_dump())

    @app.get("/v1/models")
    async def models():
        return JSONResponse(serving.list_models().model_dump())

    @app.get("/v1/models/{model:path}")  # a served name may hold "/" (org/model)
    async def model(model: str):
        return JSONResponse(serving.model_card(model).model_dump())

    @app.get("/health")
    async def health():
        serving.engine.check_health()
        return PlainTextResponse("")

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/metrics")
    async def metrics():
        stats = await serving.engine.stats()
        return PlainTextResponse(serving.metrics.render(stats), media_type="text/plain; version=0.0.4")

    return app


def _answer(result, stream: bool):
    """A stream of SSE lines, or the whole response as JSON."""
    if stream:
        return ClosingStreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump())


class APIKeyMiddleware:
    """401 for a /v1 request without 'Authorization: Bearer <key>'. Plain ASGI, not
    @app.middleware("http"): that runs each request in a task group of its own and passes
    every streamed chunk through a memory stream, on the path of each token."""

    def __init__(self, app, *, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope).startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), self.expected):
                response = _error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                  type="authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    """The path below the app's mount point: Serve passes a route_prefix as root_path and
    keeps it in path, so url.path of /prefix/v1/... does not start with /v1."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


async def _parse_body(request: Request, model: type[BaseModel], max_body_bytes: int):
    """The body as a `model` (CompletionRequest, TokenizeRequest, ...); 413 past the size
    limit, 400 for bad JSON or fields."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise APIError(413, f"request body is larger than the {max_body_bytes}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise APIError(413, f"request body is larger than the {max_body_bytes}-byte limit")
    try:
        # One pass in Rust over the bytes (json.loads decodes them to str first): 1.0 ms
        # against 2.0 on the event loop for a 2.8 MB body holding (128, 4096) float32
        # embeddings (bench_embeds_codec.py --parts, BENCHMARKS.md). Invalid UTF-8, lone
        # UTF-16 surrogates (text the tokenizer and detokenizer cannot take) and nesting
        # past its recursion limit are errors here too.
        data = pydantic_core.from_json(body, cache_strings="keys")
    except ValueError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        body = validation_error_body(exc.errors())["error"]
        raise APIError(400, body["message"], param=body["param"]) from None
