"""Errors as OpenAI's JSON bodies: whatever fails, the client gets `{"error": {...}}` with the right status."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from ttserve.contract import RequestError
from ttserve.serving.protocol import APIError

log = logging.getLogger(__name__)

# Ray's errors for a replica that stopped while serving a call (matched by name: this layer imports no Ray).
REPLICA_LOST = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "ActorUnschedulableError")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.response().model_dump(mode="json"), status_code=error.status_code)


def unwrap(error: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    return error


def as_api_error(error: BaseException) -> APIError:
    """The OpenAI error for anything the backend raised: a domain error keeps its meaning, Ray's capacity
    errors become 429, a replica lost mid-request 503, and anything else is a logged 500."""
    error = unwrap(error)
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestError):
        return APIError.of_request_error(error)
    name = type(error).__name__
    if name in ("BackPressureError", "DeploymentUnavailableError"):  # Ray Serve: replicas full or gone
        return APIError.rate_limited(f"the server is at capacity ({name}); retry later")
    if name in REPLICA_LOST:  # the replica died mid-request (its node went away): Serve replaces it
        return APIError.unavailable(f"the replica answering this request stopped ({name}); retry")
    log.exception("request failed", exc_info=error)
    return APIError.internal(f"{name}: {error}")
