"""GET /v1/models: the loaded model families and their aliases, in OpenAI's list shape,
each family with what it supports (languages, controls, tags)."""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.http.errors import BEARER_SECURITY, v1_error_responses
from gateway.http.protocol import ModelCard, ModelList
from gateway.models.families import FAMILIES
from gateway.server.services import AppServices
from gateway.speech.model_names import CREATED, OWNER, ModelNames


@get(
    "/v1/models",
    tags=["models"],
    summary="List models",
    sync_to_thread=False,
    responses=v1_error_responses({}),
    security=BEARER_SECURITY,
)
def list_models(services: NamedDependency[AppServices]) -> ModelList:
    """The loaded models (with their languages, controls and tags), then the aliases that
    point at them (`root`)."""
    names = services.model_names
    return ModelList(data=[model_card(names, model_id) for model_id in names.ids()])


@get(
    "/v1/models/{model_id:str}",
    tags=["models"],
    summary="Retrieve a model",
    sync_to_thread=False,
    responses=v1_error_responses({400: "Invalid request", 404: "Unknown or not loaded model (`code`: `model_not_found`)"}),
    security=BEARER_SECURITY,
)
def retrieve_model(model_id: FromPath[str], services: NamedDependency[AppServices]) -> ModelCard:
    """One loaded model or alias by id; 404 `model_not_found` (naming what is loaded) otherwise."""
    names = services.model_names
    names.resolve(model_id)
    return model_card(names, model_id)


def model_card(names: ModelNames, model_id: str) -> ModelCard:
    family = names.resolve(model_id)
    if model_id.strip().lower() != family.id:
        return ModelCard(id=model_id, created=CREATED, owned_by=OWNER, object="model", root=family.id)
    family = FAMILIES[family.id]
    return ModelCard(
        id=family.id,
        created=CREATED,
        owned_by=OWNER,
        object="model",
        description=family.description,
        languages=list(family.languages),
        controls=list(family.honoured),
        ignored_controls=list(family.ignored),
        tags=list(family.tags),
    )
