"""Fields built to hurt: non-UTF-8 bytes in multipart text fields, and a voice name of
900,000 characters: each a clear 400, never a 500, and never echoed or logged whole."""

from __future__ import annotations

import msgspec
import pytest
from structlog.testing import capture_logs

from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import in_process

WAV_HEAD = b"RIFF\x24\x00\x00\x00WAVEfmt "


def multipart(fields: dict[str, bytes]) -> bytes:
    body = b""
    for name, value in fields.items():
        body += b'--x\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
    body += b'--x\r\nContent-Disposition: form-data; name="audio_sample"; filename="a.wav"\r\n'
    body += b"Content-Type: audio/wav\r\n\r\n" + WAV_HEAD + b"\r\n--x--\r\n"
    return body


@pytest.mark.parametrize("fields", [{"name": b"\xff\xfe\xfa"}, {"name": b"ok", "consent": b"\xc3\x28 consent"}])
async def test_non_utf8_multipart_text_is_400(settings: Settings, fields: dict[str, bytes], api_error) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        answer = await gw.http.post(
            "/v1/audio/voices", content=multipart(fields), headers={"Content-Type": "multipart/form-data; boundary=x"}
        )
        api_error(answer, 400)


async def test_a_huge_voice_name_is_400_and_not_echoed_or_logged_whole(settings: Settings, api_error) -> None:
    huge = "v" * 900_000
    roomy = msgspec.structs.replace(settings, max_body_bytes=2 * 1_048_576)
    async with in_process(roomy, FakeEngine()) as gw:
        with capture_logs() as logs:
            answer = await gw.http.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": huge})
            api_error(answer, 400)
            as_object = await gw.http.post(
                "/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": {"id": huge}}
            )
            api_error(as_object, 400)
    assert answer.json()["error"]["param"] == "voice"
    assert len(answer.text) < 2000 and len(as_object.text) < 2000
    assert all(len(repr(line)) < 5000 for line in logs)
