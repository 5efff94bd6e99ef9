"""How the ElevenLabs routes describe themselves in the OpenAPI document: their key (either
header) and their error shape."""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import SecurityScheme

XI_API_KEY_SCHEME = "XiApiKey"

ELEVENLABS_SECURITY: list[dict[str, list[str]]] = [{XI_API_KEY_SCHEME: []}, {"BearerAuth": []}]
"""Either header carries the key (enforced only when keys are configured)."""


def xi_api_key_scheme() -> SecurityScheme:
    return SecurityScheme(
        type="apiKey",
        name="xi-api-key",
        security_scheme_in="header",
        description="An API key (ElevenLabs' header), when the server has keys configured; otherwise any value.",
    )


def elevenlabs_error_responses(descriptions: dict[int, str]) -> dict[int, ResponseSpec]:
    """OpenAPI entries for a route's error statuses in ElevenLabs' ``{"detail": ...}`` shape,
    with the 401 every route can answer when keys are configured."""
    from gateway.http.elevenlabs.protocol import ElevenLabsError

    described = {401: "Missing or wrong API key (`status`: `invalid_api_key`); only when keys are configured", **descriptions}
    return {
        status: ResponseSpec(data_container=ElevenLabsError, description=text, generate_examples=False)
        for status, text in described.items()
    }
