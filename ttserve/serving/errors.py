"""Errors as OpenAI's JSON bodies: whatever fails, the client gets `{"error": {...}}` with the right status."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from ttserve.contract import RequestError
from ttserve.serving.protocol import APIError, ErrorResponse

log = logging.getLogger(__name__)

# Ray's errors for a replica that stopped while serving a call (matched by name: this layer imports no Ray).
REPLICA_LOST = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "ActorUnschedulableError")
# vLLM's error once its engine process has died: the replica's health check fails and Serve replaces it.
ENGINE_LOST = ("EngineDeadError",)


class ErrorJSON(JSONResponse):
    """An error body in ASCII JSON. Errors quote what the client sent (a parameter's name, its value, the
    model asked for), and JSON's \\ud800 escapes decode to unpaired surrogates that UTF-8 cannot encode:
    escaped, any such quote is still valid JSON, and the error is never a 500 of its own."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error's JSON body and status; a refusal that is worth retrying says when (Retry-After)."""
    headers = dict(headers or {})
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return ErrorJSON(error.response().model_dump(mode="json"), status_code=error.status_code, headers=headers)


ERROR_MEANINGS = {
    400: "Invalid request: the parameter is named in `error.param`",
    401: "Missing or invalid API key (when the server has one)",
    404: "Unknown model, or no such route",
    408: "The request body did not arrive in time",
    413: "The request body is over the server's limit",
    422: "The model has no chat template: use /v1/completions",
    429: "Too many requests in flight, or the replicas are full: retry later",
    500: "A server fault",
    503: "The model is still loading, the replica is at capacity, or the replica answering stopped: retry",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses: each an OpenAI error body."""
    return {status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]} for status in statuses}


def unwrap(error: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    return error


def as_api_error(error: BaseException) -> APIError:
    """The OpenAI error for anything the backend raised: a domain error keeps its meaning, Ray's capacity
    errors become 429, a replica or its engine lost mid-request 503, and anything else is a logged 500."""
    error = unwrap(error)
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestError):
        return APIError.of_request_error(error)
    name = type(error).__name__
    if name in ("BackPressureError", "DeploymentUnavailableError"):  # Ray Serve: replicas full or gone
        return APIError.rate_limited(f"the server is at capacity ({name}); retry later")
    if name in REPLICA_LOST:  # the replica died mid-request (its node went away): Serve replaces it
        return APIError.unavailable(
            f"the replica answering this request stopped ({name}); retry", retry_after=1
        )
    if name in ENGINE_LOST:
        return APIError.unavailable(
            f"the inference engine of the replica answering this request stopped ({name}); the replica is "
            "being replaced: retry",
            retry_after=5,
        )
    log.exception("request failed", exc_info=error)
    return APIError.internal(f"{name}: {error}")
