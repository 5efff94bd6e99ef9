"""The playground and the API docs pages in a real browser (headless Chromium), against a
live server on loopback with the fake engine: they load with no console errors and nothing
from the internet, Speak plays audio as it arrives, an uploaded voice is listed and usable,
server errors are shown, with and without API keys."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from browser_support import Watched, launch_browser, watched_page
from gateway.app import create_app
from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import serve_on_loopback

REPO = Path(__file__).resolve().parents[2]
CLIP = REPO / "voices" / "aria.flac"
SCREENSHOT = REPO / "docs" / "playground.png"
"""Rewritten when CHATTERBOX_UPDATE_SCREENSHOT=1 (otherwise the test's screenshot goes to a
temporary folder, so a test run leaves the work tree as it was)."""
KEY = "sk-playground-test"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


def _serve(settings: Settings, engine: FakeEngine) -> Iterator[str]:
    with serve_on_loopback(create_app(settings, engine=engine)) as base_url:
        yield base_url


@pytest.fixture
def engine() -> FakeEngine:
    # pieces of 0.4 s audio every 0.15 s: the response takes a few seconds, so "plays before
    # the download ends" is observable
    return FakeEngine(piece_delay_s=0.15)


@pytest.fixture
def server(settings: Settings, engine: FakeEngine) -> Iterator[str]:
    yield from _serve(msgspec.structs.replace(settings, max_speech_tokens=200), engine)


@pytest.fixture
def keyed_server(settings: Settings, engine: FakeEngine) -> Iterator[str]:
    # CORS on for another site: the page is same-origin and must not be affected
    configured = msgspec.structs.replace(settings, api_keys=(KEY,), cors_origins=("https://app.example",))
    yield from _serve(configured, engine)


def _open(browser: Any, base_url: str) -> Watched:
    watched = watched_page(browser, base_url)
    watched.page.goto(base_url + "/")
    return watched


def _pickers_loaded(watched: Watched) -> None:
    watched.wait_js("document.querySelector('#ready').classList.contains('ok')")
    watched.wait_js("document.querySelector('#voice').options.length > 1 && document.querySelector('#model').value")


def _ms(watched: Watched, cell: str) -> float:
    text = watched.page.text_content(cell)
    match = re.fullmatch(r"(\d+) ms", text or "")
    assert match, f"{cell} shows {text!r}"
    return float(match.group(1))


def _speak_and_wait(watched: Watched) -> None:
    watched.page.click("#speak")
    watched.wait_js("document.querySelector('#rtf').textContent !== '–' || !document.querySelector('#speak-error').hidden")
    assert watched.page.is_hidden("#speak-error"), watched.page.text_content("#speak-error")


def test_page_loads_and_speak_streams_audio(browser: Any, server: str, engine: FakeEngine) -> None:
    watched = _open(browser, server)
    page = watched.page
    _pickers_loaded(watched)
    models = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert "chatterbox" in models and "tts-1" in models
    assert "alloy" in page.text_content("#voice")  # OpenAI names shown as aliases

    page.fill("#input", "The playground streams this sentence. " * 6)
    _speak_and_wait(watched)

    first_audio, total = _ms(watched, "#ttfa"), _ms(watched, "#total")
    # playback began while the response was still arriving (MediaSource), not after it
    assert 0 < first_audio < total, (first_audio, total)
    assert float(page.text_content("#rtf")) > 0
    assert page.evaluate("document.querySelector('#player').currentTime") > 0
    assert page.get_attribute("#download", "href").startswith("blob:")
    assert page.get_attribute("#download", "download") == "speech.mp3"
    assert engine.jobs[-1].streaming
    assert watched.problems() == []


def test_stop_ends_the_request_and_the_sound(browser: Any, server: str, engine: FakeEngine) -> None:
    watched = _open(browser, server)
    page = watched.page
    _pickers_loaded(watched)
    page.fill("#input", "A long text that takes a while to speak. " * 20)
    page.click("#speak")
    watched.wait_js("document.querySelector('#ttfa').textContent !== '–'")  # playing, still downloading
    page.click("#stop")
    assert page.text_content("#play-state") == "stopped"
    assert page.evaluate("document.querySelector('#player').paused")
    # the server saw the client go and cancelled the engine job
    deadline = time.monotonic() + 10
    while not engine.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cancelled
    # aborting the fetch is a failed request by design; nothing else
    assert [p for p in watched.problems() if "/v1/audio/speech" not in p] == []


@pytest.mark.parametrize("response_format", ["wav", "pcm", "opus", "aac", "flac"])
def test_every_format_plays(browser: Any, server: str, response_format: str) -> None:
    watched = _open(browser, server)
    _pickers_loaded(watched)
    watched.page.select_option("#format", response_format)
    _speak_and_wait(watched)
    assert _ms(watched, "#ttfa") > 0
    seconds = float(watched.page.text_content("#duration").removesuffix(" s"))
    assert seconds > 0.5  # decoded by the browser (pcm: counted)
    assert watched.page.get_attribute("#download", "download") == f"speech.{response_format}"
    assert watched.problems() == []


def test_uploaded_voice_is_listed_used_and_deleted(
    browser: Any, server: str, engine: FakeEngine, tmp_path: Path
) -> None:
    watched = _open(browser, server)
    page = watched.page
    _pickers_loaded(watched)
    page.fill("#voice-name", "my-aria")
    page.set_input_files("#voice-file", str(CLIP))
    assert page.is_disabled("#create-voice")  # no consent yet
    page.check("#voice-consent")
    page.click("#create-voice")
    watched.wait_js("document.querySelector('#voice-list [data-voice-id]')")
    voice_id = page.get_attribute("#voice-list [data-voice-id]", "data-voice-id")
    assert "my-aria" in page.text_content("#voice-list")
    assert page.input_value("#voice") == voice_id  # the new voice is picked for Speak

    # a screenshot for the README: controls moved, a seed, the Python snippet shown
    page.click("#controls summary")
    page.fill("#control-list input[name=exaggeration]", "0.8")
    page.fill("#seed", "42")
    page.click("[data-snippet=python]")
    _speak_and_wait(watched)
    assert engine.jobs[-1].voice.name in (voice_id, "my-aria")
    assert engine.jobs[-1].params.exaggeration == pytest.approx(0.8)
    snippet = page.text_content("#snippet")
    assert f'voice="{voice_id}"' in snippet and '"exaggeration": 0.8' in snippet and '"seed": 42' in snippet
    shot = SCREENSHOT if os.environ.get("CHATTERBOX_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")

    page.click("#voice-list [data-voice-id] button")
    watched.wait_js("!document.querySelector('#voice-list [data-voice-id]')")
    assert voice_id not in page.eval_on_selector_all("#voice option", "options => options.map(o => o.value)")
    assert watched.problems() == []


def test_a_voice_recorded_from_the_microphone_is_created(browser: Any, server: str) -> None:
    watched = _open(browser, server)
    page = watched.page
    _pickers_loaded(watched)
    page.click("#record")
    watched.wait_js("document.querySelector('#record').textContent === 'Stop recording'")
    time.sleep(3.6)  # the server wants at least 3 s of audio
    page.click("#record")
    watched.wait_js("!document.querySelector('#clip-preview').hidden")
    page.fill("#voice-name", "recorded")
    page.check("#voice-consent")
    page.click("#create-voice")
    watched.wait_js("document.querySelector('#voice-list [data-voice-id]') || !document.querySelector('#voice-error').hidden")
    assert page.is_hidden("#voice-error"), page.text_content("#voice-error")
    assert "recorded" in page.text_content("#voice-list")
    assert watched.problems() == []


def test_server_error_message_is_shown(browser: Any, server: str) -> None:
    watched = _open(browser, server)
    _pickers_loaded(watched)
    watched.page.click("#controls summary")
    watched.page.fill("#seed", str(2**33))  # above the server's largest seed
    watched.page.click("#speak")
    watched.wait_js("!document.querySelector('#speak-error').hidden")
    error = watched.page.text_content("#speak-error")
    assert "HTTP 400" in error and "param: seed" in error
    assert watched.page.text_content("#play-state") == "failed"
    # the browser itself logs the 400 response; nothing else may go wrong
    assert watched.problems(allow_console=("status of 400",)) == []


def test_api_key_is_asked_for_and_kept_for_the_tab_only(browser: Any, keyed_server: str) -> None:
    watched = _open(browser, keyed_server)
    page = watched.page
    watched.wait_js("!document.querySelector('#speak-error').hidden")
    assert "Missing API key" in page.text_content("#speak-error")
    assert "HTTP 401" in page.text_content("#speak-error")

    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    _pickers_loaded(watched)
    assert page.is_hidden("#speak-error")
    assert 'Authorization: Bearer $CHATTERBOX_API_KEY' in page.text_content("#snippet")
    assert KEY not in page.text_content("#snippet")
    _speak_and_wait(watched)
    assert _ms(watched, "#ttfa") > 0

    assert page.evaluate("sessionStorage.length") == 1 and page.evaluate("localStorage.length") == 0
    page.reload()  # same tab: the key stays
    _pickers_loaded(watched)
    assert page.input_value("#api-key") == KEY
    assert watched.problems(allow_console=("status of 401",)) == []

    other_tab = _open(browser, keyed_server)  # a new browsing context starts without it
    other_tab.wait_js("!document.querySelector('#speak-error').hidden")
    assert other_tab.page.input_value("#api-key") == ""


@pytest.mark.parametrize(("path", "rendered"), [
    ("/schema/swagger", ".swagger-ui .opblock-summary-path[data-path='/v1/audio/speech']"),
    ("/schema/redoc", "#redoc-container h1"),
    ("/schema", "#redoc-container h1"),
])
def test_api_docs_render_with_no_network(browser: Any, keyed_server: str, path: str, rendered: str) -> None:
    watched = watched_page(browser, keyed_server)
    watched.page.goto(keyed_server + path)
    watched.page.wait_for_selector(rendered, timeout=20_000)
    assert "chatterbox-gateway" in watched.page.text_content("body")
    assert watched.problems() == []
