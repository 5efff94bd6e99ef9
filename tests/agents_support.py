"""What the voice-agent client tests (tests/agents/) share: the server they talk to (all three
model families loaded, so every client's default ElevenLabs model id maps onto one; an API key
given as ``xi-api-key``; TLS where a client insists on it) and the checks on word timings and
cancelled engine jobs. (Audio is decoded by ``decoded_audio.decode_output``.)
(A module with its own name, not a conftest, so any test file can import it.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import msgspec

from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from ops_support import Live, live_server, wait_until
from tls_support import TlsFiles

API_KEY = "sk-agents-test"
VOICE = "alloy"
"""A built-in voice, by one of its names (ElevenLabs clients call it ``voice_id``): the voice
listing shows it among a built-in voice's ``aliases``."""
ALL_FAMILIES = ("chatterbox", "chatterbox-turbo", "chatterbox-multilingual")


def agent_settings(settings: Settings, tls: TlsFiles | None = None, **extra: object) -> Settings:
    tls_fields = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)} if tls else {}
    return msgspec.structs.replace(settings, models=ALL_FAMILIES, api_keys=(API_KEY,), **tls_fields, **extra)


@contextmanager
def agent_server(settings: Settings, engine: FakeEngine, tls: TlsFiles | None = None, **extra: object) -> Iterator[Live]:
    """The gateway with the production server configuration on loopback (https:// with ``tls``)."""
    config = agent_settings(settings, tls, **extra)
    with live_server(config, engine, guarded=True, tls_client=tls.client_context() if tls else None) as live:
        yield live


def pcm_seconds(data: bytes, sample_rate: int) -> float:
    assert len(data) % 2 == 0, "PCM16 must be whole samples"
    return len(data) / 2 / sample_rate


def assert_word_times(words: list[tuple[str, float]], text: str, audio_s: float) -> None:
    """Every word of ``text`` (split at spaces) in order, with start times that do not go
    back and that fall inside the audio."""
    assert [w for w, _ in words] == text.split(), words
    starts = [t for _, t in words]
    assert starts == sorted(starts), words
    assert starts[0] >= 0 and starts[-1] < audio_s + 0.05, (words, audio_s)
    assert starts[-1] > 0, words  # not all at zero: real times


def assert_cancelled_and_freed(live: Live, marker: str, timeout_s: float = 10.0) -> None:
    """The engine job that speaks ``marker`` was cancelled (not completed), and every admission
    slot is back."""
    engine = live.engine

    def job_ids() -> list[str]:
        return [job.request_id for job in engine.jobs if any(marker in chunk for chunk in job.chunks)]

    assert wait_until(lambda: bool(job_ids()), timeout_s), [job.chunks for job in engine.jobs]
    assert wait_until(lambda: any(rid in engine.cancelled for rid in job_ids()), timeout_s), (
        job_ids(), engine.cancelled, engine.completed)
    assert not any(rid in engine.completed for rid in job_ids())
    assert wait_until(lambda: live.services.admission.in_flight == 0, timeout_s), live.services.admission.in_flight
