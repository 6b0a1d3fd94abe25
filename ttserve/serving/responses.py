"""What the generating endpoints share: calling the backend, and writing its answer in OpenAI's shapes
(usage, finish reasons, server-sent events, the `ttt` object)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ttserve.contract import GenerateRequest, GenerationChunk, Started
from ttserve.serving.errors import as_api_error
from ttserve.serving.metrics import Metrics
from ttserve.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, UsageInfo


@dataclass
class Answer:
    """The backend's answer to one request: `events` to stream, or the `whole` generation."""

    id: str
    started: Started
    events: AsyncIterator[GenerationChunk] | None = None
    whole: GenerationChunk | None = None


async def answer(request: Request, body: ChatCompletionRequest | CompletionRequest, id_prefix: str) -> Answer:
    """Check the model, convert the wire request, and ask the backend: a stream (its first event already
    received, so errors before it are HTTP errors) or the whole answer in one call."""
    check_model(request, body.model)
    generate = body.to_generate_request()
    generate.cache_salt = salted(getattr(request.state, "tenant_salt", None), generate.cache_salt)
    response_id = f"{id_prefix}-{uuid.uuid4().hex}"
    if body.stream:
        events, started = await start_stream(request, generate)
        return Answer(response_id, started, events=events)
    started, whole = await complete(request, generate)
    return Answer(response_id, started, whole=whole)


def salted(tenant: str | None, requested: str | None) -> str | None:
    """The adapter salt of a request: its tenant's (by API key) and its own `cache_salt`, both kept."""
    parts = [part for part in (tenant, requested) if part]
    return "\0".join(parts) if parts else None


def check_model(request: Request, model: str) -> None:
    served = request.app.state.backend.model_id
    if model != served:
        raise APIError.not_found(
            f"The model `{model}` does not exist. This server serves `{served}`.",
            param="model",
            code="model_not_found",
        )


async def start_stream(request: Request, generate: GenerateRequest):
    """The backend's stream and its first event; errors before it become HTTP errors, not broken streams."""
    events = request.app.state.backend.stream(generate)
    try:
        started = await anext(events)
    except Exception as error:  # noqa: BLE001
        raise as_api_error(error) from None
    return events, started


async def complete(request: Request, generate: GenerateRequest) -> tuple[Started, GenerationChunk]:
    """A non-streamed answer in one call to the backend (one Ray round trip, not one per token)."""
    try:
        started, whole = await request.app.state.backend.complete(generate)
    except Exception as error:  # noqa: BLE001
        raise as_api_error(error) from None
    record(request.app.state.metrics, started, whole)
    return started, whole


def record(metrics: Metrics, started: Started, final: GenerationChunk) -> None:
    metrics.record_ttt(started.ttt)
    if final.usage is not None:
        metrics.tokens.labels("prompt").inc(final.usage.prompt_tokens)
        metrics.tokens.labels("completion").inc(final.usage.completion_tokens)


def usage(chunk: GenerationChunk) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=chunk.usage.prompt_tokens,
        completion_tokens=chunk.usage.completion_tokens,
        total_tokens=chunk.usage.total_tokens,
    )


def finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


# --- streaming ----------------------------------------------------------------------------------------------
def sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def event(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class StreamTimer:
    """Time to the first text of a streamed answer, and the final usage, for the metrics."""

    def __init__(self, metrics: Metrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.begun, self.first, self.final = time.perf_counter(), True, GenerationChunk()

    def saw(self, piece: GenerationChunk) -> None:
        if self.first and piece.text:
            self.metrics.first_token.labels(self.endpoint).observe(time.perf_counter() - self.begun)
            self.first = False
        self.final.usage = piece.usage or self.final.usage

    def done(self, started: Started) -> None:
        record(self.metrics, started, self.final)


def guarded(stream: Callable[[], AsyncIterator[str]]) -> StreamingResponse:
    """A server-sent event stream in which a fault mid-stream becomes an OpenAI error event; the stream
    still ends with [DONE]."""

    async def events():
        try:
            async for piece in stream():
                yield piece
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001
            api_error = as_api_error(error)
            yield f"data: {json.dumps(api_error.response().model_dump(mode='json'))}\n\n"
        yield "data: [DONE]\n\n"

    return sse(events())
