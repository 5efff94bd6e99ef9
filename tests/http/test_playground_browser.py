"""The playground and the API docs pages in a real browser (headless Chromium), against a
live server on loopback with the fake engine, at desktop size and on a 390 px phone: they load
with no console errors and nothing from the internet and never scroll sideways; Speak plays
audio as it arrives (every format, both stream formats) and the page follows the request to
the end of playback; the text is checked before it is sent; the pickers follow the loaded
model families (languages, Turbo's tags); a voice can be heard, created and deleted; errors
and API keys are handled as a person would need. Each test leaves a full-page screenshot in
its temporary folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from browser_support import Watched, launch_browser, watched_page
from gateway.app import create_app
from gateway.engine.fake import FakeEngine
from gateway.models.families import FAMILIES, MULTILINGUAL, TURBO
from gateway.settings import Settings
from harness import serve_on_loopback

REPO = Path(__file__).resolve().parents[2]
CLIP = REPO / "voices" / "aria.flac"
SCREENSHOT = REPO / "docs" / "playground.png"
"""Rewritten when CHATTERBOX_UPDATE_SCREENSHOT=1 (otherwise the test's screenshot goes to a
temporary folder, so a test run leaves the work tree as it was)."""
KEY = "sk-playground-test"
ALL_FAMILIES = tuple(FAMILIES)
DEFAULT_TEXT = "Hello! This is Chatterbox, speaking from your own server."


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


@pytest.fixture(params=["desktop", "phone"])
def size(request: pytest.FixtureRequest) -> str:
    return request.param


def _serve(settings: Settings, engine: FakeEngine, **options: Any) -> Iterator[str]:
    with serve_on_loopback(create_app(settings, engine=engine), **options) as base_url:
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
def families_server(settings: Settings, engine: FakeEngine) -> Iterator[str]:
    yield from _serve(msgspec.structs.replace(settings, models=ALL_FAMILIES, max_speech_tokens=200), engine)


@pytest.fixture
def keyed_server(settings: Settings) -> Iterator[str]:
    # CORS on for another site: the page is same-origin and must not be affected. The engine
    # takes 2 s to load, so the page opens while /ready still says 503.
    configured = msgspec.structs.replace(settings, api_keys=(KEY,), cors_origins=("https://app.example",))
    yield from _serve(configured, FakeEngine(start_delay_s=2.0), ready_path="/health")


def _open(browser: Any, base_url: str, size: str = "desktop", *, loaded: bool = True) -> Watched:
    """The page at ``size``; ``loaded``: once the engine is ready and the pickers are filled."""
    watched = watched_page(browser, base_url, size)
    watched.page.goto(base_url + "/")
    if loaded:
        _pickers_loaded(watched)
    return watched


def _pickers_loaded(watched: Watched) -> None:
    watched.wait_js("document.querySelector('#ready').classList.contains('ok')")
    watched.wait_js("document.querySelector('#voice').options.length > 1 && !document.querySelector('#speak').disabled")


def _ms(watched: Watched, cell: str) -> float:
    text = watched.page.text_content(cell)
    match = re.fullmatch(r"(\d+) ms", text or "")
    assert match, f"{cell} shows {text!r}"
    return float(match.group(1))


def _speak_and_wait(watched: Watched, button: str = "#speak") -> None:
    watched.page.click(button)
    # downloaded (the stats are in) and playing (first audio is in; it may come a moment
    # after the download on a short text), or failed
    watched.wait_js(
        "(document.querySelector('#rtf').textContent !== '–' && document.querySelector('#ttfa').textContent !== '–')"
        " || !document.querySelector('#speak-error').hidden"
    )
    assert watched.page.is_hidden("#speak-error"), watched.page.text_content("#speak-error")


def _played_to_the_end(watched: Watched) -> None:
    """The state says done once playback has ended, and Stop is off again."""
    watched.wait_js("document.querySelector('#play-state').textContent === 'done'")
    assert watched.page.is_disabled("#stop")


def _player_src(watched: Watched) -> str:
    return watched.page.evaluate("document.querySelector('#player').getAttribute('src') || ''")


def _options(watched: Watched, select: str) -> list[tuple[str, str]]:
    return [tuple(pair) for pair in watched.page.eval_on_selector_all(select + " option", "os => os.map(o => [o.value, o.textContent])")]


def test_page_loads_and_speak_streams_audio(browser: Any, server: str, engine: FakeEngine, size: str, tmp_path: Path) -> None:
    watched = _open(browser, server, size)
    page = watched.page
    assert _options(watched, "#model") == [("chatterbox", "chatterbox (tts-1, tts-1-hd, gpt-4o-mini-tts)")]
    assert "alloy" in page.text_content("#voice")  # OpenAI names shown as aliases
    assert page.is_hidden("#language-field") and page.is_hidden("#tag-picker")  # English, no tags

    page.fill("#input", "The playground streams this sentence. " * 6)
    page.click("#speak")
    watched.wait_js("document.querySelector('#play-state').textContent === 'playing'")
    assert page.is_enabled("#stop")
    watched.wait_js("document.querySelector('#rtf').textContent !== '–'")
    first_audio, total = _ms(watched, "#ttfa"), _ms(watched, "#total")
    # playback began while the response was still arriving (MediaSource), not after it
    assert 0 < first_audio < total, (first_audio, total)
    assert float(page.text_content("#rtf")) > 0
    assert page.get_attribute("#download", "href").startswith("blob:")
    assert page.get_attribute("#download", "download") == "speech.mp3"
    assert engine.jobs[-1].streaming
    _played_to_the_end(watched)
    assert page.evaluate("document.querySelector('#player').currentTime") > 0
    watched.fits_and_shoot(tmp_path / f"spoken-{size}.png")
    assert watched.problems() == []


def test_stop_ends_the_request_and_the_sound(browser: Any, server: str, engine: FakeEngine, size: str) -> None:
    watched = _open(browser, server, size)
    page = watched.page
    page.fill("#input", "A long text that takes a while to speak. " * 20)
    page.click("#speak")
    watched.wait_js("document.querySelector('#ttfa').textContent !== '–'")  # playing, still downloading
    page.click("#stop")
    assert page.text_content("#play-state") == "stopped"
    assert page.is_disabled("#stop")
    assert page.evaluate("document.querySelector('#player').paused")
    # the server saw the client go and cancelled the engine job
    deadline = time.monotonic() + 10
    while not engine.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cancelled
    # aborting the fetch is a failed request by design; nothing else
    assert [p for p in watched.problems() if "/v1/audio/speech" not in p] == []


@pytest.mark.parametrize("response_format", ["wav", "pcm", "opus", "aac", "flac"])
def test_every_format_plays_to_the_end(browser: Any, server: str, response_format: str) -> None:
    watched = _open(browser, server)
    watched.page.select_option("#format", response_format)
    _speak_and_wait(watched)
    assert _ms(watched, "#ttfa") > 0
    seconds = float(watched.page.text_content("#duration").removesuffix(" s"))
    assert seconds > 0.5  # decoded by the browser (pcm: counted)
    assert watched.page.get_attribute("#download", "download") == f"speech.{response_format}"
    _played_to_the_end(watched)
    # the player holds this response, whole, to play again (wav and pcm played through Web
    # Audio; pcm is given to the player as WAV)
    assert _player_src(watched).startswith("blob:")
    watched.wait_js("document.querySelector('#player').duration > 0.5")
    assert watched.problems() == []


def test_the_player_holds_only_the_current_response(browser: Any, server: str, size: str, tmp_path: Path) -> None:
    watched = _open(browser, server, size)
    page = watched.page
    page.select_option("#format", "wav")
    _speak_and_wait(watched)
    _played_to_the_end(watched)
    first = _player_src(watched)
    assert first.startswith("blob:")

    page.select_option("#format", "pcm")
    page.fill("#input", "A second, different sentence to speak.")
    page.click("#speak")
    assert _player_src(watched) != first  # emptied at once, not left on the last answer
    watched.wait_js("document.querySelector('#rtf').textContent !== '–'")
    _played_to_the_end(watched)
    second = _player_src(watched)
    assert second.startswith("blob:") and second != first
    assert float(page.evaluate("document.querySelector('#player').duration")) == pytest.approx(
        float(page.text_content("#duration").removesuffix(" s")), abs=0.05
    )

    page.click("#controls summary")
    page.fill("#seed", str(2**33))  # the server refuses it
    page.click("#speak")
    watched.wait_js("!document.querySelector('#speak-error').hidden")
    assert page.text_content("#play-state") == "failed"
    assert _player_src(watched) == "" and page.is_disabled("#stop")
    assert page.get_attribute("#download", "aria-disabled") == "true"
    watched.fits_and_shoot(tmp_path / f"failed-{size}.png")
    assert watched.problems(allow_console=("status of 400",)) == []


def test_text_is_checked_in_the_page_with_its_count(
    browser: Any, server: str, engine: FakeEngine, size: str, tmp_path: Path
) -> None:
    watched = _open(browser, server, size)
    page = watched.page
    assert page.text_content("#input-count") == f"{len(DEFAULT_TEXT)} / 4096"
    for blank in ("", "  \n "):
        page.fill("#input", blank)
        assert page.text_content("#input-count") == f"{len(blank)} / 4096"
        page.click("#speak")
        assert "Type the text to speak first." in page.text_content("#speak-error")
        assert page.evaluate("document.activeElement.id") == "input"
    assert "bad" in page.get_attribute("#input-count", "class")
    watched.fits_and_shoot(tmp_path / f"empty-{size}.png")

    page.fill("#input", "x" * 5000)  # the field takes the first 4096
    assert len(page.input_value("#input")) == 4096
    assert page.text_content("#input-count") == "4096 / 4096"
    page.fill("#input", "Now there is something to say.")
    _speak_and_wait(watched)
    assert [job.chunks for job in engine.jobs] == [("Now there is something to say.",)]  # nothing blank was sent
    assert watched.problems() == []


def test_api_key_is_asked_for_and_kept_for_the_tab_only(browser: Any, keyed_server: str, size: str, tmp_path: Path) -> None:
    watched = _open(browser, keyed_server, size, loaded=False)
    page = watched.page
    # asked at once (the engine is still loading), the field focused; no raw 401
    watched.wait_js("!document.querySelector('#key-note').hidden")
    assert page.text_content("#key-note") == "This server needs an API key: enter it here and press Enter."
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert page.is_hidden("#speak-error")
    assert _options(watched, "#model") == [("", "enter the API key first")]
    assert page.is_disabled("#speak") and page.is_disabled("#hear-voice")
    assert page.text_content("#ready") in ("not ready", "ready")
    watched.fits_and_shoot(tmp_path / f"key-asked-{size}.png")

    page.fill("#api-key", "sk-wrong")
    page.press("#api-key", "Enter")
    watched.wait_js("document.querySelector('#key-note').textContent.includes('refused')")
    assert "Incorrect API key provided." in page.text_content("#key-note")
    assert page.evaluate("document.activeElement.id") == "api-key"

    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    _pickers_loaded(watched)
    assert page.is_hidden("#key-note") and page.is_hidden("#speak-error")
    assert 'Authorization: Bearer $CHATTERBOX_API_KEY' in page.text_content("#snippet")
    assert KEY not in page.text_content("#snippet")
    _speak_and_wait(watched)
    assert _ms(watched, "#ttfa") > 0

    assert page.evaluate("sessionStorage.length") == 1 and page.evaluate("localStorage.length") == 0
    watched.reload()  # same tab: the key stays
    _pickers_loaded(watched)
    assert page.input_value("#api-key") == KEY and page.is_hidden("#key-note")
    # the browser logs the 401s and the 503s of /ready while the engine loads; nothing else
    assert watched.problems(allow_console=("status of 401", "status of 503")) == []

    other_tab = _open(browser, keyed_server, size, loaded=False)  # a new browsing context starts without it
    other_tab.wait_js("!document.querySelector('#key-note').hidden")
    assert other_tab.page.input_value("#api-key") == ""


def test_models_language_and_tags_follow_the_loaded_families(
    browser: Any, families_server: str, engine: FakeEngine, size: str, tmp_path: Path
) -> None:
    watched = _open(browser, families_server, size)
    page = watched.page
    # one entry per family, the OpenAI names folded in, the dated snapshots left out
    assert _options(watched, "#model") == [
        ("chatterbox", "chatterbox (tts-1-hd)"),
        ("chatterbox-turbo", "chatterbox-turbo (tts-1)"),
        ("chatterbox-multilingual", "chatterbox-multilingual (gpt-4o-mini-tts)"),
    ]
    assert page.is_hidden("#language-field") and page.is_hidden("#tag-picker")

    page.select_option("#model", MULTILINGUAL)
    assert page.is_visible("#language-field") and page.is_hidden("#tag-picker")
    languages = _options(watched, "#language")
    assert languages[0] == ("", "detect from the text") and ("fr", "French (fr)") in languages
    assert len(languages) == 1 + len(FAMILIES[MULTILINGUAL].languages)
    assert "Multilingual" in page.text_content("#model-note")
    page.fill("#input", "Bonjour, je parle français aujourd'hui.")
    page.select_option("#language", "fr")
    assert '"language": "fr"' in _python_snippet(watched)
    _speak_and_wait(watched)
    assert (engine.jobs[-1].model, engine.jobs[-1].language) == (MULTILINGUAL, "fr")
    page.select_option("#language", "")  # detection: no `language` sent
    assert "language" not in _python_snippet(watched)
    watched.fits_and_shoot(tmp_path / f"multilingual-{size}.png")

    page.select_option("#model", TURBO)
    assert page.is_hidden("#language-field") and page.is_visible("#tag-picker")
    tags = page.eval_on_selector_all("#tag-list button", "bs => bs.map(b => b.textContent)")
    assert tags == list(FAMILIES[TURBO].tags)
    # the controls Turbo ignores are greyed out and left out of the request
    page.click("#controls summary")
    assert page.is_disabled("#control-list input[name=exaggeration]")
    assert page.is_enabled("#control-list input[name=temperature]")
    page.fill("#input", "Well that went fine.")
    page.evaluate("document.querySelector('#input').setSelectionRange(4, 4)")  # after "Well"
    page.click("#tag-list button[data-tag='[chuckle]']")
    assert page.input_value("#input") == "Well [chuckle] that went fine."
    _speak_and_wait(watched)
    assert (engine.jobs[-1].model, engine.jobs[-1].chunks) == (TURBO, ("Well [chuckle] that went fine.",))
    watched.fits_and_shoot(tmp_path / f"turbo-{size}.png")
    assert watched.problems() == []


def _python_snippet(watched: Watched) -> str:
    watched.page.click("[data-snippet=python]")
    return watched.page.text_content("#snippet")


def test_a_voice_can_be_heard(browser: Any, server: str, engine: FakeEngine, size: str) -> None:
    watched = _open(browser, server, size)
    page = watched.page
    voice = next(value for value, label in _options(watched, "#voice") if "nova" in label)
    page.select_option("#voice", voice)
    page.fill("#input", "The text in the box is not what Hear says.")
    _speak_and_wait(watched, "#hear-voice")
    job = engine.jobs[-1]
    assert job.voice.name == voice and job.chunks[0].startswith(f"Hello, this is the voice {voice}")
    _played_to_the_end(watched)
    assert page.input_value("#input") == "The text in the box is not what Hear says."
    assert watched.problems() == []


def test_sse_plays_and_its_snippets_run(
    browser: Any, server: str, engine: FakeEngine, size: str, tmp_path: Path, valid_audio: Callable[..., Any]
) -> None:
    watched = _open(browser, server, size)
    page = watched.page
    page.select_option("#stream-format", "sse")
    page.select_option("#format", "wav")
    _speak_and_wait(watched)
    assert _ms(watched, "#ttfa") > 0 and engine.jobs[-1].streaming
    assert float(page.text_content("#duration").removesuffix(" s")) > 0.5  # the decoded events are a WAV file
    _played_to_the_end(watched)

    curl = page.text_content("#snippet")
    assert curl.startswith(f"curl -N {server}/v1/audio/speech") and '"stream_format":"sse"' in curl
    assert "--output" not in curl
    python = _python_snippet(watched)
    assert 'stream_format="sse",' in python
    # the page's Python, run as a user would paste it: the OpenAI SDK writes the audio the
    # events carried
    subprocess.run([sys.executable, "-c", python], cwd=tmp_path, check=True, timeout=60)
    valid_audio((tmp_path / "speech.wav").read_bytes(), "wav")
    watched.fits_and_shoot(tmp_path / f"sse-{size}.png")
    assert watched.problems() == []


def test_an_error_in_the_event_stream_is_shown(browser: Any, settings: Settings, tmp_path: Path) -> None:
    failing = FakeEngine(piece_delay_s=0.15, fail_after_pieces=2)
    with serve_on_loopback(create_app(msgspec.structs.replace(settings, max_speech_tokens=200), engine=failing)) as base_url:
        watched = _open(browser, base_url)
        page = watched.page
        page.select_option("#stream-format", "sse")
        page.fill("#input", "This sentence is long enough to fail half way through its audio. " * 3)
        page.click("#speak")
        watched.wait_js("!document.querySelector('#speak-error').hidden")
        error = page.text_content("#speak-error")
        assert "(during the stream" in error and "HTTP" not in error, error
        assert page.text_content("#play-state") == "failed"
        assert _player_src(watched) == "" and page.is_disabled("#stop")
        watched.fits_and_shoot(tmp_path / "sse-error.png")
        assert watched.problems() == []


def test_uploaded_voice_is_listed_used_and_deleted(
    browser: Any, families_server: str, engine: FakeEngine, size: str, tmp_path: Path
) -> None:
    watched = _open(browser, families_server, size)
    page = watched.page
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
    update = os.environ.get("CHATTERBOX_UPDATE_SCREENSHOT") == "1" and size == "desktop"
    watched.fits_and_shoot(SCREENSHOT if update else tmp_path / f"{SCREENSHOT.stem}-{size}.png")

    # Delete asks first: no deletes nothing, yes deletes
    answers: list[str] = []

    def answer(dialog: Any) -> None:
        answers.append(dialog.message)
        dialog.accept() if len(answers) > 1 else dialog.dismiss()

    page.on("dialog", answer)
    page.click("#voice-list [data-voice-id] button")
    assert answers == [f'Delete the voice "my-aria" ({voice_id})? This cannot be undone.']
    assert page.is_visible("#voice-list [data-voice-id]")
    page.click("#voice-list [data-voice-id] button")
    watched.wait_js("!document.querySelector('#voice-list [data-voice-id]')")
    assert len(answers) == 2
    assert voice_id not in [value for value, _ in _options(watched, "#voice")]
    assert watched.problems() == []


def test_a_voice_recorded_from_the_microphone_is_created(browser: Any, server: str) -> None:
    watched = _open(browser, server)
    page = watched.page
    page.click("#record")
    watched.wait_js("document.querySelector('#record').textContent === 'Stop recording'")
    time.sleep(6.0)  # the server wants at least 3 s of audio (a stalled host's capture may drop some)
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
    watched.page.click("#controls summary")
    watched.page.fill("#seed", str(2**33))  # above the server's largest seed
    watched.page.click("#speak")
    watched.wait_js("!document.querySelector('#speak-error').hidden")
    error = watched.page.text_content("#speak-error")
    assert "HTTP 400" in error and "param: seed" in error
    assert watched.page.text_content("#play-state") == "failed"
    # the browser itself logs the 400 response; nothing else may go wrong
    assert watched.problems(allow_console=("status of 400",)) == []


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
