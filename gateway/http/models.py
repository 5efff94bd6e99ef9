"""GET /v1/models: the models and their OpenAI aliases, in OpenAI's list shape."""

from __future__ import annotations

from litestar import get
from litestar.params import FromPath

from gateway.http.errors import BEARER_SECURITY, v1_error_responses
from gateway.speech.model_names import CREATED, OWNER, model_ids, resolve_model
from gateway.http.protocol import ModelCard, ModelList


@get(
    "/v1/models",
    tags=["models"],
    summary="List models",
    sync_to_thread=False,
    responses=v1_error_responses({}),
    security=BEARER_SECURITY,
)
def list_models() -> ModelList:
    """Every accepted model id: `chatterbox` and the OpenAI names that alias it."""
    return ModelList(data=[ModelCard(id=model_id, created=CREATED, owned_by=OWNER) for model_id in model_ids()])


@get(
    "/v1/models/{model_id:str}",
    tags=["models"],
    summary="Retrieve a model",
    sync_to_thread=False,
    responses=v1_error_responses({400: "Invalid request", 404: "Unknown model (`code`: `model_not_found`)"}),
    security=BEARER_SECURITY,
)
def retrieve_model(model_id: FromPath[str]) -> ModelCard:
    """One model or alias by id; 404 `model_not_found` for anything else."""
    resolve_model(model_id)
    return ModelCard(id=model_id, created=CREATED, owned_by=OWNER)
