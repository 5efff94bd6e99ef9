"""Garbage in, never a 5xx out: every hostile body gets 200 with valid audio or a clean 4xx
in the OpenAI envelope."""

from __future__ import annotations

import json

import pytest

from gateway.audio.encoder import CONTENT_TYPES
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import in_process


def speech_json(text: str, **extra: object) -> bytes:
    return json.dumps({"model": "tts-1", "voice": "alloy", "response_format": "wav", "input": text, **extra}).encode()


FORMAT_OF = {media: fmt for fmt, media in CONTENT_TYPES.items()}
BASE = b'"model": "tts-1", "voice": "alloy", "response_format": "wav"'

HOSTILE: dict[str, bytes] = {
    "control characters": speech_json("Hello\x00\x01\x07\x1b[31m world\x7f\u0085\u2028 end."),
    "only control characters": speech_json("\x00\x01\x02\x1b\x7f"),
    "emoji": speech_json("Hello 👋🏽 world 🎉👨‍👩‍👧‍👦 and 🇫🇷!"),
    "only emoji": speech_json("🎉🎉🎉"),
    "right to left": speech_json("שלום עולם. مرحبا بالعالم. \u202eReversed\u202c text."),
    "one 4096-character word": speech_json("a" * 4096),
    "4096 emoji (many bytes)": speech_json("😀" * 4096),
    "4097 characters": speech_json("b" * 4097),
    "only punctuation": speech_json("?!...,,;;--()[]{}"),
    "only whitespace": speech_json(" \t\n\u00a0\u3000"),
    "numbers only": speech_json("1234567890 3.14159 -42 1e10 0x1F"),
    "SSML-looking markup": speech_json(
        '<speak><prosody rate="fast">Hi</prosody><break time="1s"/><audio src="file:///etc/passwd"/></speak>'
    ),
    "HTML and script": speech_json("<script>alert(1)</script>&amp;&#x27;"),
    "format-string bait": speech_json("%s %n %x {0} {input} ${HOME} $(id) `id`"),
    "lone surrogate escape": b'{' + BASE + b', "input": "bad \\ud800 surrogate"}',
    "invalid UTF-8 bytes": b'{' + BASE + b', "input": "\xff\xfe\xc3\x28 broken"}',
    "overlong UTF-8": b'{' + BASE + b', "input": "\xc0\xaf"}',
    "UTF-16 body": speech_json("Hello").decode().encode("utf-16"),
    "BOM before JSON": b"\xef\xbb\xbf" + speech_json("Hello"),
    "huge number for speed": b'{' + BASE + b', "input": "Hi", "speed": 1e400}',
    "huge integer seed": b'{' + BASE + b', "input": "Hi", "seed": ' + b"9" * 400 + b"}",
    "negative huge temperature": b'{' + BASE + b', "input": "Hi", "temperature": -1e308}',
    "NaN literal": b'{' + BASE + b', "input": "Hi", "speed": NaN}',
    "Infinity literal": b'{' + BASE + b', "input": "Hi", "exaggeration": Infinity}',
    "speed as string": b'{' + BASE + b', "input": "Hi", "speed": "fast"}',
    "boolean seed": b'{' + BASE + b', "input": "Hi", "seed": true}',
    "object as input": b'{' + BASE + b', "input": {"text": "Hi"}}',
    "array as input": b'{' + BASE + b', "input": ["Hi"]}',
    "number as input": b'{' + BASE + b', "input": 42}',
    "null input": b'{' + BASE + b', "input": null}',
    "object as model": b'{"model": {"id": "tts-1"}, "voice": "alloy", "input": "Hi"}',
    "nested voice object": b'{"model": "tts-1", "voice": {"id": {"id": "alloy"}}, "input": "Hi"}',
    "voice path traversal": speech_json("Hi", voice="../../../etc/passwd"),
    "voice with NUL": speech_json("Hi", voice="alloy\x00.wav"),
    "very long voice": speech_json("Hi", voice="v" * 5000),
    "duplicate keys": b'{"model": "tts-1", "model": "tts-1-hd", "voice": "alloy", "voice": "echo", "input": "A", "input": "B"}',
    "deeply nested JSON": b'{"model": "tts-1", "voice": "alloy", "input": "Hi", "extra": '
    + b"[" * 5000
    + b"]" * 5000
    + b"}",
    "truncated JSON": b'{"model": "tts-1", "voice": "alloy", "input": "Hi',
    "empty body": b"",
    "just null": b"null",
    "a JSON string": b'"tts-1"',
    "a JSON array": b'[{"model": "tts-1", "voice": "alloy", "input": "Hi"}]',
    "unknown fields": speech_json("Hi", unknown={"deep": [1, 2, {"x": None}]}, another=[1e308]),
    "bad response_format": speech_json("Hi", response_format="exe"),
    "bad stream_format": speech_json("Hi", stream_format="../../x"),
    "instructions too long": speech_json("Hi", instructions="x" * 5000),
}


@pytest.fixture(scope="module")
def shared_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    base = tmp_path_factory.mktemp("hostile")
    return Settings(
        engine="fake",
        cache_dir=str(base / "cache"),
        voices_dir=str(base / "voices"),
        max_speech_tokens=50,
        max_body_bytes=64 * 1024,
    )


async def test_hostile_speech_bodies_never_5xx(shared_settings: Settings, valid_audio, api_error) -> None:
    results: dict[str, int] = {}
    async with in_process(shared_settings, FakeEngine()) as gw:
        for case, body in HOSTILE.items():
            response = await gw.http.post(
                "/v1/audio/speech", content=body, headers={"Content-Type": "application/json"}
            )
            results[case] = response.status_code
            assert response.status_code < 500, (case, response.status_code, response.text[:300])
            if response.status_code == 200:
                fmt = FORMAT_OF[response.headers["content-type"].split(";")[0]]
                valid_audio(response.content, fmt)
            else:
                assert 400 <= response.status_code < 500, case
                api_error(response, response.status_code)
        assert (await gw.http.get("/ready")).status_code == 200  # still healthy after all of it
    # what must be refused is refused; what is speakable is spoken
    for case in ("4097 characters", "invalid UTF-8 bytes", "huge number for speed", "object as input",
                 "number as input", "NaN literal", "truncated JSON", "a JSON array", "voice path traversal",
                 "bad response_format", "nested voice object"):
        assert results[case] == 400, (case, results[case])
    for case in ("emoji", "right to left", "one 4096-character word", "numbers only", "SSML-looking markup",
                 "control characters", "unknown fields", "4096 emoji (many bytes)"):
        assert results[case] == 200, (case, results[case])


async def test_hostile_headers_and_methods(shared_settings: Settings, api_error) -> None:
    async with in_process(shared_settings, FakeEngine()) as gw:
        body = speech_json("Hi")
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""):
            response = await gw.http.post("/v1/audio/speech", content=body, headers={"Content-Type": content_type})
            assert 400 <= response.status_code < 500, content_type
            api_error(response, response.status_code)
        too_big = speech_json("x" * 100) + b" " * (shared_settings.max_body_bytes + 1)
        api_error(
            await gw.http.post("/v1/audio/speech", content=too_big, headers={"Content-Type": "application/json"}),
            413,
        )
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            api_error(await gw.http.request(method, "/v1/audio/speech"), 405)
        weird = await gw.http.post(
            "/v1/audio/speech",
            content=body,
            headers={"Content-Type": "application/json", "x-request-id": "x" * 10_000 + "\u0000"},
        )
        assert weird.status_code == 200 and len(weird.headers["x-request-id"]) <= 128
