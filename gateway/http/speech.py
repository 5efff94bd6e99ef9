"""POST /v1/audio/speech: read the body, hand it to the speech service, stream the result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIMediaType as MediaType
from litestar.openapi.spec import Operation, RequestBody, Schema
from litestar.response import Stream

from gateway.http.disconnect import unless_disconnected
from gateway.http.errors import BEARER_SECURITY, v1_error_responses
from gateway.http.request_context import request_id_of
from gateway.audio.encoder import CONTENT_TYPES
from gateway.errors import UnsupportedMediaTypeError
from gateway.http.protocol import SpeechRequest, decode_speech_request
from gateway.observability.request_record import current_record
from gateway.server.services import AppServices
from gateway.speech.service import SSE_CONTENT_TYPE, prepare_speech

_ERRORS = {
    400: "Invalid request: `param` names the field (also malformed JSON, a non-object body, "
    "a wrong Content-Type, an unknown voice)",
    404: "Unknown model (`code`: `model_not_found`)",
    413: "Body larger than the configured limit",
    429: "Too much work in flight (Retry-After set)",
    503: "Engine loading or failed, or the queue wait limit passed (Retry-After set)",
    504: "The request time limit passed before the first byte",
}


def speech_request_schema() -> dict[str, Any]:
    """JSON schema of the speech body, inlined: we decode the body ourselves, so Litestar
    cannot derive it from the handler signature or register it as a component."""
    _, components = msgspec.json.schema_components((SpeechRequest,), ref_template="{name}")

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(components[node["$ref"]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(components["SpeechRequest"])


@dataclass
class _SpeechOperation(Operation):
    """The documented request body and every audio media type of the 200 response."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            content={"application/json": MediaType(schema=speech_request_schema())},  # type: ignore[arg-type]
        )
        if self.responses and "200" in self.responses:
            ok = self.responses["200"]
            binary = Schema(type="string", format="binary")  # type: ignore[arg-type]
            content = {media: MediaType(schema=binary) for media in dict.fromkeys(CONTENT_TYPES.values())}
            content[SSE_CONTENT_TYPE] = MediaType(schema=Schema(type="string"))  # type: ignore[arg-type]
            ok.content = content  # type: ignore[union-attr]


@post(
    "/v1/audio/speech",
    status_code=200,
    tags=["audio"],
    summary="Create speech",
    operation_class=_SpeechOperation,
    response_description="The audio file in `response_format`, sent as it is produced (or SSE events "
    "with base64 audio when `stream_format` is `sse`).",
    responses=v1_error_responses(_ERRORS),
    security=BEARER_SECURITY,
)
async def create_speech(request: Request[Any, Any, Any], services: NamedDependency[AppServices]) -> Stream:
    """Speech from text, OpenAI-compatible. Chatterbox controls (`exaggeration`, `cfg_weight`,
    `temperature`, `top_p`, `min_p`, `repetition_penalty`, `seed`) go in the same body."""
    media_type = request.content_type[0]
    if media_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"Content-Type must be application/json, got '{media_type or 'none'}'.", param="Content-Type"
        )
    record = current_record()
    body = await request.body()
    record.mark("body read")
    speech = decode_speech_request(body)
    record.mark("body decoded")
    # a client that leaves while queued or before the first audio stops its work right away
    prepared = await unless_disconnected(
        request.receive, prepare_speech(services, speech, request_id_of(request.scope))
    )
    headers = {"Cache-Control": "no-cache"}

    async def close_body() -> None:
        # A coroutine function: Litestar runs any other callable in a worker thread, where
        # ``aclose`` would only create an awaitable that nobody awaits.
        await prepared.body.aclose()

    return Stream(
        prepared.body,
        media_type=prepared.media_type,
        headers=headers,
        # Runs when the body ends, also after a client disconnect: closing the iterator is
        # what cancels the engine job and kills the encoder.
        background=BackgroundTask(close_body),
    )
