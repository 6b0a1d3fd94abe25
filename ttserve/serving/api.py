"""The OpenAI-compatible HTTP API: wire protocol in, `GenerateRequest` to a backend, wire protocol out.

`build_api(backend, settings)` makes the FastAPI app. The backend is anything with
`stream(GenerateRequest) -> AsyncIterator[Started | GenerationChunk]` and a `model_id`: the in-process
`Generator` (local.py, tests) or a Ray Serve handle to the generator deployment (app.py).

Errors are OpenAI's JSON error bodies with the matching status. Validation happens before any work, and
the backend raises APIError for what only it can check (context length, budget cap), before its first event:
so a bad request never starts a stream, and a failed request leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttserve.config import Settings
from ttserve.engines import GenerationChunk, SamplingParams
from ttserve.serving.generator import GenerateRequest, Started
from ttserve.serving.metrics import Metrics
from ttserve.serving.protocol import (
    APIError,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    validation_error_to_api_error,
)

log = logging.getLogger(__name__)


class Backend(Protocol):
    model_id: str

    def stream(self, request: GenerateRequest) -> AsyncIterator[Started | GenerationChunk]: ...

    async def complete(self, request: GenerateRequest) -> tuple[Started, GenerationChunk]: ...


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.response().model_dump(mode="json"), status_code=error.status_code)


def unwrap(error: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    return error


def as_api_error(error: BaseException) -> APIError:
    error = unwrap(error)
    if isinstance(error, APIError):
        return error
    name = type(error).__name__
    if name in ("BackPressureError", "DeploymentUnavailableError"):  # Ray Serve: replicas full or gone
        return APIError.rate_limited(f"the server is at capacity ({name}); retry later")
    log.exception("request failed", exc_info=error)
    return APIError.internal(f"{name}: {error}")


def build_api(backend: Backend, settings: Settings) -> FastAPI:
    server = settings.server
    metrics = Metrics()
    app = FastAPI(title="ttserve", summary="OpenAI-compatible LLM serving with test-time training")
    app.state.metrics = metrics
    in_flight = {"count": 0}

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error_to_api_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(APIError.not_found(f"no route {request.method} {request.url.path}"))
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(APIError(error.status_code, str(error.detail), kind))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        """Size limit, authentication, concurrency limit and request metrics, before any parsing.

        A request counts as in flight, and its latency runs, until the last byte of its body has gone:
        a streamed answer is still being generated long after its headers were sent.
        """
        endpoint = metrics.endpoint(request.url.path)
        started = time.perf_counter()
        refusal = await _admit(request)
        if refusal is not None:
            metrics.requests.labels(endpoint, str(refusal.status_code)).inc()
            return refusal
        counted = endpoint in ("chat", "completions")
        if counted:
            in_flight["count"] += 1
            metrics.in_flight.inc()

        def done() -> None:
            if counted:
                in_flight["count"] -= 1
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

    async def _admit(request: Request) -> Response | None:
        path = request.url.path
        if server.api_key is not None and path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {server.api_key.get_secret_value()}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error_response(
                    APIError.unauthorized("missing or invalid API key (Authorization: Bearer ...)")
                )
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > server.max_request_bytes:
                return error_response(
                    APIError.too_large(
                        f"request body is {length} bytes; the limit is {server.max_request_bytes}"
                    )
                )
            body = await request.body()  # also catches chunked bodies with no content-length
            if len(body) > server.max_request_bytes:
                return error_response(
                    APIError.too_large(f"request body is over the limit of {server.max_request_bytes} bytes")
                )
            if (
                path in ("/v1/chat/completions", "/v1/completions")
                and in_flight["count"] >= server.max_concurrent_requests
            ):
                return error_response(
                    APIError.rate_limited(f"{in_flight['count']} requests in flight; retry later")
                )
        return None

    def check_model(model: str) -> None:
        if model != backend.model_id:
            raise APIError.not_found(
                f"The model `{model}` does not exist. This server serves `{backend.model_id}`.",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        # Answered by the ingress alone: it stays responsive while a generator replica trains.
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=backend.model_id)]).model_dump(mode="json")

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return ModelCard(id=model_id).model_dump(mode="json")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        check_model(body.model)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request = _generate_request(
            body, messages=body.chat_messages(), max_tokens=body.max_new_tokens, logprobs=logprobs
        )
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            events, started = await _start(backend, request)
            return _sse(_chat_stream(response_id, body, events, started, metrics))
        started, whole = await _complete(backend, request, metrics)
        choice = ChatCompletionChoice(
            message=ChatResponseMessage(content=whole.text),
            logprobs=ChatLogprobs(content=[_chat_logprob(e) for e in whole.logprobs])
            if body.logprobs
            else None,
            finish_reason=_finish(whole.finish_reason),
        )
        return ChatCompletionResponse(
            id=response_id, model=body.model, choices=[choice], usage=_usage(whole), ttt=started.ttt
        ).model_dump(mode="json")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        request = _generate_request(
            body,
            prompt=body.prompt,
            max_tokens=body.max_tokens,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
        )
        response_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            events, started = await _start(backend, request)
            echo = _echo(body, started) if body.echo else None
            return _sse(_completion_stream(response_id, body, events, started, echo, metrics))
        started, whole = await _complete(backend, request, metrics)
        echo = _echo(body, started) if body.echo else None
        text, logprobs = (
            whole.text,
            _completion_logprobs(whole.logprobs) if body.logprobs is not None else None,
        )
        if echo is not None:
            text = echo[0] + text
            logprobs = _join_logprobs(echo[1], logprobs) if logprobs is not None else None
        choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=_finish(whole.finish_reason))
        return CompletionResponse(
            id=response_id, model=body.model, choices=[choice], usage=_usage(whole), ttt=started.ttt
        ).model_dump(mode="json")

    return app


# --- request and response conversion --------------------------------------------------------------------
def _generate_request(body, *, max_tokens, logprobs, prompt=None, messages=None, prompt_logprobs=None):
    ttt = body.ttt
    return GenerateRequest(
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        sampling=SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(body.normalized_stop()),
            seed=body.seed,
            logprobs=logprobs,
        ),
        compute_budget=body.compute_budget,
        strategy=ttt.strategy if ttt else None,
        lam=ttt.lam if ttt else None,
        mode=ttt.mode if ttt else None,
        deadline_s=ttt.deadline_s if ttt else None,
        n=ttt.n if ttt else None,
        prompt_logprobs=prompt_logprobs,
        request_id=uuid.uuid4().hex,
    )


async def _start(backend: Backend, request: GenerateRequest):
    """The backend's stream and its first event; errors before it become HTTP errors, not broken streams."""
    events = backend.stream(request)
    try:
        started = await anext(events)
    except Exception as error:  # noqa: BLE001
        raise as_api_error(error) from None
    return events, started


async def _complete(backend: Backend, request: GenerateRequest, metrics: Metrics):
    """A non-streamed answer in one call to the backend (one Ray round trip, not one per token)."""
    try:
        started, whole = await backend.complete(request)
    except Exception as error:  # noqa: BLE001
        raise as_api_error(error) from None
    _record(metrics, started, whole)
    return started, whole


def _record(metrics: Metrics, started: Started, final: GenerationChunk) -> None:
    metrics.record_ttt(started.ttt)
    if final.usage is not None:
        metrics.tokens.labels("prompt").inc(final.usage.prompt_tokens)
        metrics.tokens.labels("completion").inc(final.usage.completion_tokens)


def _usage(chunk: GenerationChunk) -> UsageInfo:
    usage = chunk.usage
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _chat_logprob(entry) -> TokenLogprob:
    return TokenLogprob(
        token=entry.token,
        logprob=entry.logprob,
        bytes=_token_bytes(entry.token),
        top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=_token_bytes(t)) for _, t, lp in entry.top],
    )


def _completion_logprobs(entries, offset: int = 0) -> CompletionLogprobs:
    logprobs = CompletionLogprobs()
    for entry in entries:
        logprobs.tokens.append(entry.token)
        logprobs.token_logprobs.append(entry.logprob)
        logprobs.top_logprobs.append({t: lp for _, t, lp in entry.top})
        logprobs.text_offset.append(offset)
        offset += len(entry.token)
    return logprobs


def _echo(body: CompletionRequest, started: Started) -> tuple[str, CompletionLogprobs | None]:
    """The prompt's text and, with logprobs, its per-token logprobs (the first token has none)."""
    scores = started.prompt_scores
    text = body.prompt if isinstance(body.prompt, str) else None
    if scores is None:
        return (text if text is not None else ""), None
    logprobs = CompletionLogprobs()
    offset = 0
    for token, logprob, top in zip(scores.tokens, scores.logprobs, scores.top, strict=True):
        logprobs.tokens.append(token)
        logprobs.token_logprobs.append(logprob)
        logprobs.top_logprobs.append(None if top is None else {t: lp for _, t, lp in top})
        logprobs.text_offset.append(offset)
        offset += len(token)
    return (text if text is not None else "".join(scores.tokens)), logprobs


def _join_logprobs(prompt: CompletionLogprobs | None, completion: CompletionLogprobs) -> CompletionLogprobs:
    if prompt is None:
        return completion
    shift = (prompt.text_offset[-1] + len(prompt.tokens[-1])) if prompt.tokens else 0
    return CompletionLogprobs(
        tokens=prompt.tokens + completion.tokens,
        token_logprobs=prompt.token_logprobs + completion.token_logprobs,
        top_logprobs=prompt.top_logprobs + completion.top_logprobs,
        text_offset=prompt.text_offset + [o + shift for o in completion.text_offset],
    )


# --- streaming ----------------------------------------------------------------------------------------------
def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def _guarded(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """A fault mid-stream becomes an OpenAI error event; the stream still ends with [DONE]."""
    try:
        async for event in stream:
            yield event
    except asyncio.CancelledError:
        raise
    except Exception as error:  # noqa: BLE001
        api_error = as_api_error(error)
        yield f"data: {json.dumps(api_error.response().model_dump(mode='json'))}\n\n"
    yield "data: [DONE]\n\n"


def _chat_stream(response_id, body: ChatCompletionRequest, events, started: Started, metrics: Metrics):
    async def stream():
        begun, first, final = time.perf_counter(), True, GenerationChunk()

        def chunk(choices, **extra):
            return _event(ChatCompletionChunk(id=response_id, model=body.model, choices=choices, **extra))

        yield chunk([ChatCompletionChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
        async for piece in events:
            if first and piece.text:
                metrics.first_token.labels("chat").observe(time.perf_counter() - begun)
                first = False
            final.usage = piece.usage or final.usage
            logprobs = (
                ChatLogprobs(content=[_chat_logprob(e) for e in piece.logprobs]) if body.logprobs else None
            )
            if piece.final:
                ttt_here = None if body.include_usage else started.ttt
                yield chunk(
                    [
                        ChatCompletionChunkChoice(
                            delta=DeltaMessage(content=piece.text) if piece.text else DeltaMessage(),
                            logprobs=logprobs,
                            finish_reason=_finish(piece.finish_reason),
                        )
                    ],
                    ttt=ttt_here,
                )
                if body.include_usage:
                    yield chunk([], usage=_usage(piece), ttt=started.ttt)
            elif piece.text or piece.logprobs:
                yield chunk(
                    [ChatCompletionChunkChoice(delta=DeltaMessage(content=piece.text), logprobs=logprobs)]
                )
        _record(metrics, started, final)

    return _guarded(stream())


def _completion_stream(
    response_id, body: CompletionRequest, events, started: Started, echo, metrics: Metrics
):
    async def stream():
        begun, first, final = time.perf_counter(), True, GenerationChunk()
        with_logprobs = body.logprobs is not None
        offset = 0

        def chunk(choices, **extra):
            return _event(CompletionChunk(id=response_id, model=body.model, choices=choices, **extra))

        if echo is not None:
            yield chunk([CompletionChoice(text=echo[0], logprobs=echo[1] if with_logprobs else None)])
            offset = len(echo[0])
        async for piece in events:
            if first and piece.text:
                metrics.first_token.labels("completions").observe(time.perf_counter() - begun)
                first = False
            final.usage = piece.usage or final.usage
            logprobs = _completion_logprobs(piece.logprobs, offset) if with_logprobs else None
            offset += sum(len(e.token) for e in piece.logprobs)
            if piece.final:
                yield chunk(
                    [
                        CompletionChoice(
                            text=piece.text, logprobs=logprobs, finish_reason=_finish(piece.finish_reason)
                        )
                    ],
                    ttt=None if body.include_usage else started.ttt,
                )
                if body.include_usage:
                    yield chunk([], usage=_usage(piece), ttt=started.ttt)
            elif piece.text or piece.logprobs:
                yield chunk([CompletionChoice(text=piece.text, logprobs=logprobs)])
        _record(metrics, started, final)

    return _guarded(stream())
