"""GET /v1/models and /v1/models/{id}: the one model this server serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ttserve.serving.errors import documented
from ttserve.serving.protocol import ModelCard, ModelList
from ttserve.serving.responses import check_model

router = APIRouter()


# response_model=None: the 200 is documented as the model written, not as the annotation's any dict.
@router.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **documented(401)})
async def list_models(request: Request) -> dict[str, Any]:
    return ModelList(data=[ModelCard(id=request.app.state.backend.model_id)]).model_dump(mode="json")


@router.get(
    "/v1/models/{model_id:path}",
    response_model=None,
    responses={200: {"model": ModelCard}, **documented(401, 404)},
)
async def model(model_id: str, request: Request) -> dict[str, Any]:
    check_model(request, model_id)
    return ModelCard(id=model_id).model_dump(mode="json")
