"""The OpenAI-compatible HTTP API: `build_api(backend, settings)` makes the FastAPI app.

The app is thin. Each endpoint (routes/) takes a validated wire request (protocol.py), lets it convert
itself into a `GenerateRequest`, hands that to the backend, and writes the backend's `Started` and
`GenerationChunk`s back as OpenAI responses (responses.py). What every request passes through lives here:
admission (API key, body size, the concurrency limit), request metrics, and errors as OpenAI error bodies.

The backend is anything with `model_id`, `stream`, `complete` and `stats`: a `GeneratorReplica` in-process
(local.py) or a Ray handle to the Generator deployment (app.py). Nothing this module imports loads an ML
library, so the ingress runs on a fraction of a CPU (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttserve.config import Settings
from ttserve.contract import GenerateRequest, GenerationChunk, ReplicaStats, Started
from ttserve.serving.errors import error_response
from ttserve.serving.metrics import Metrics
from ttserve.serving.protocol import APIError, validation_error_to_api_error
from ttserve.serving.routes import chat, completions, models, operations

GENERATING = ("chat", "completions")  # the endpoints that count towards the concurrency limit


class Backend(Protocol):
    model_id: str

    def stream(self, request: GenerateRequest) -> AsyncIterator[Started | GenerationChunk]: ...

    async def complete(self, request: GenerateRequest) -> tuple[Started, GenerationChunk]: ...

    async def stats(self) -> ReplicaStats: ...


def build_api(backend: Backend, settings: Settings) -> FastAPI:
    app = FastAPI(title="ttserve", summary="OpenAI-compatible LLM serving with test-time training")
    app.state.backend = backend
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.in_flight = 0  # generating requests being answered, until their last byte
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_guard)
    for routes in (chat, completions, models, operations):
        app.include_router(routes.router)
    return app


async def _api_error(_: Request, error: APIError) -> Response:
    return error_response(error)


async def _validation_error(_: Request, error: RequestValidationError) -> Response:
    return error_response(validation_error_to_api_error(error))


async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
    if error.status_code == 404:
        return error_response(APIError.not_found(f"no route {request.method} {request.url.path}"))
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return error_response(APIError(error.status_code, str(error.detail), kind))


async def _guard(request: Request, call_next) -> Response:
    """Size limit, authentication, concurrency limit and request metrics, before any parsing.

    A request counts as in flight, and its latency runs, until the last byte of its body has gone:
    a streamed answer is still being generated long after its headers were sent.
    """
    state = request.app.state
    metrics: Metrics = state.metrics
    endpoint = metrics.endpoint(request.url.path)
    started = time.perf_counter()
    refusal = await _refusal(request, state.settings, state.in_flight)
    if refusal is not None:
        metrics.requests.labels(endpoint, str(refusal.status_code)).inc()
        return error_response(refusal)
    counted = endpoint in GENERATING
    if counted:
        state.in_flight += 1
        metrics.in_flight.inc()

    def done() -> None:
        if counted:
            state.in_flight -= 1
            metrics.in_flight.dec()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    try:
        response = await call_next(request)
    except BaseException:
        done()
        raise
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    body = response.body_iterator

    async def body_then_done():
        try:
            async for piece in body:
                yield piece
        finally:
            done()

    response.body_iterator = body_then_done()
    return response


async def _refusal(request: Request, settings: Settings, in_flight: int) -> APIError | None:
    """Why a request is refused before it is parsed (None: let it in)."""
    server, path = settings.server, request.url.path
    keys = accepted_keys(settings)
    request.state.tenant_salt = None
    if keys and path.startswith("/v1/"):
        given = request.headers.get("authorization", "").encode()
        # Every key is compared (no early exit), so the time taken does not say which one came close.
        matches = [hmac.compare_digest(given, f"Bearer {key}".encode()) for key in keys]
        if not any(matches):
            return APIError.unauthorized("missing or invalid API key (Authorization: Bearer ...)")
        if server.salt_adapters_by_key is not False:
            request.state.tenant_salt = tenant_salt(keys[matches.index(True)])
    if request.method != "POST":
        return None
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > server.max_request_bytes:
        return APIError.too_large(f"request body is {length} bytes; the limit is {server.max_request_bytes}")
    body = await request.body()  # also catches chunked bodies with no content-length
    if len(body) > server.max_request_bytes:
        return APIError.too_large(f"request body is over the limit of {server.max_request_bytes} bytes")
    generating = request.app.state.metrics.endpoint(path) in GENERATING
    if generating and in_flight >= server.max_concurrent_requests:
        return APIError.rate_limited(f"{in_flight} requests in flight; retry later")
    return None


def accepted_keys(settings: Settings) -> list[str]:
    """The API keys that authenticate: `server.api_key` and `server.api_keys`."""
    server = settings.server
    keys = [server.api_key] if server.api_key is not None else []
    return [key.get_secret_value() for key in [*keys, *server.api_keys]]


def tenant_salt(key: str) -> str:
    """What a key's adapters are salted with: derived from the key, never the key itself."""
    return hashlib.sha256(b"ttserve adapter salt\0" + key.encode()).hexdigest()[:16]
