"""GET /health and GET /metrics: answered by the ingress itself, so they stay responsive while a generator
replica trains."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from ttserve.serving.errors import unwrap

router = APIRouter()
log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 2.0  # a scrape must not hang on a busy or restarting generator


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    state = request.app.state
    try:
        stats = await asyncio.wait_for(state.backend.stats(), STATS_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - the ingress's own metrics are still worth serving
        log.warning("could not read the generator's counters: %r", unwrap(error))
        stats = None
    state.metrics.replica.update(stats)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
