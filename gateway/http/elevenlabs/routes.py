"""The ElevenLabs face's routes, in one router with the face's own error shape."""

from __future__ import annotations


from litestar import Router

from gateway.http.elevenlabs.errors import handle_exception
from gateway.http.elevenlabs.tts import convert, convert_with_timestamps, stream, stream_with_timestamps
from gateway.http.elevenlabs.voices import get_voice, list_voices
from gateway.http.elevenlabs.websocket import (
    multi_stream_input,
    multi_stream_input_upgrade,
    stream_input,
    stream_input_upgrade,
)


def elevenlabs_router() -> Router:
    """Every route of the face, with its own error shape."""
    return Router(
        path="/",
        route_handlers=[
            convert,
            stream,
            convert_with_timestamps,
            stream_with_timestamps,
            list_voices,
            get_voice,
            stream_input,
            multi_stream_input,
            stream_input_upgrade,
            multi_stream_input_upgrade,
        ],
        exception_handlers={Exception: handle_exception},
    )
