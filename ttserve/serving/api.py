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

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

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
    # One schema per model: the responses' own serializers would otherwise document them as any object.
    app = FastAPI(
        title="ttserve",
        summary="OpenAI-compatible LLM serving with test-time training",
        separate_input_output_schemas=False,
    )
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
    app.openapi = lambda: _openapi(app)
    return app


# pydantic writes a bound on an optional field whose type has its own validator (`Int | None = Field(ge=0)`)
# under the constraint's Python name, which JSON Schema ignores: the document would allow -1.
_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document, corrected to what the server does: errors are OpenAI error bodies with
    the statuses each route documents (errors.documented), never FastAPI's 422 validation body, and every
    bound is a JSON Schema keyword. Clients and schema-driven tests (tests/test_hostile.py) read it."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for path in schema["paths"].values():
            for operation in path.values():
                if "HTTPValidationError" in str(operation["responses"].get("422", "")):
                    del operation["responses"]["422"]
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        _rename_bounds(components)
        app.openapi_schema = schema
    return app.openapi_schema


def _rename_bounds(node: Any) -> None:
    if isinstance(node, dict):
        if "type" in node:
            for name, keyword in _BOUNDS.items():
                if name in node:
                    node[keyword] = node.pop(name)
        for value in node.values():
            _rename_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _rename_bounds(value)


async def _api_error(_: Request, error: APIError) -> Response:
    return error_response(error)


async def _validation_error(_: Request, error: RequestValidationError) -> Response:
    return error_response(validation_error_to_api_error(error))


async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
    if error.status_code == 404:
        return error_response(APIError.not_found(f"no route {request.method} {request.url.path}"))
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    # headers: a 405 names the methods allowed (Allow), as HTTP requires.
    return error_response(APIError(error.status_code, str(error.detail), kind), error.headers)


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
        # "Bearer <key>", the scheme in any case (RFC 9110).
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        given = token.strip().encode()
        # Every key is compared (no early exit), so the time taken does not say which one came close.
        matches = [hmac.compare_digest(given, key.encode()) for key in keys]
        if scheme.lower() != "bearer" or not any(matches):
            return APIError.unauthorized("missing or invalid API key (Authorization: Bearer ...)")
        if server.salt_adapters_by_key is not False:
            request.state.tenant_salt = tenant_salt(keys[matches.index(True)])
    if request.method != "POST":
        return None
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > server.max_request_bytes:
        return APIError.too_large(f"request body is {length} bytes; the limit is {server.max_request_bytes}")
    try:
        refusal = await asyncio.wait_for(_read_body(request, server.max_request_bytes), server.body_timeout_s)
    except TimeoutError:  # a slow-loris body (server.body_timeout_s)
        return APIError(
            408, f"the request body did not arrive within {server.body_timeout_s:g} s", code="request_timeout"
        )
    if refusal is not None:
        return refusal
    generating = request.app.state.metrics.endpoint(path) in GENERATING
    if generating and in_flight >= server.max_concurrent_requests:
        return APIError.rate_limited(f"{in_flight} requests in flight; retry later")
    return None


async def _read_body(request: Request, limit: int) -> APIError | None:
    """Read the body piece by piece and refuse it as soon as it passes `limit`: a chunked body has no
    content-length to check first, and must not be held whole in memory only to be refused."""
    pieces, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            return APIError.too_large(f"request body is over the limit of {limit} bytes")
        pieces.append(piece)
    # Where Starlette keeps a body once read; BaseHTTPMiddleware hands it on to the endpoint from there.
    request._body = b"".join(pieces)
    return None


def accepted_keys(settings: Settings) -> list[str]:
    """The API keys that authenticate: `server.api_key` and `server.api_keys`."""
    server = settings.server
    keys = [server.api_key] if server.api_key is not None else []
    return [key.get_secret_value() for key in [*keys, *server.api_keys]]


def tenant_salt(key: str) -> str:
    """What a key's adapters are salted with: derived from the key, never the key itself."""
    return hashlib.sha256(b"ttserve adapter salt\0" + key.encode()).hexdigest()[:16]
