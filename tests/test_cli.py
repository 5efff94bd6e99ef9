"""The command line: one flag per setting, fail-fast start-up, the OpenAPI export, and the
README's own commands (serve, curl, the OpenAI SDK, the voice upload) against a server started
by the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from harness import cli_serve

from gateway.cli import build_parser, main, openapi_json, settings_from_args
from gateway.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_every_setting_has_a_serve_flag() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {option for action in serve._actions for option in action.option_strings}
    for name in Settings.__struct_fields__:
        assert "--" + name.replace("_", "-") in flags, name


def test_flags_become_typed_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CHATTERBOX_"):
            monkeypatch.delenv(key)
    args = build_parser().parse_args(
        [
            "serve",
            "--load-format", "dummy",
            "--engine", "fake",
            "--port", "9123",
            "--no-watermark",
            "--api-keys", "k1,k2",
        ]
    )
    settings = settings_from_args(args)
    assert (settings.load_format, settings.engine, settings.port, settings.watermark) == ("dummy", "fake", 9123, False)
    assert settings.api_keys == ("k1", "k2")
    assert settings.max_speech_tokens == Settings().max_speech_tokens


def test_environment_applies_where_no_flag_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATTERBOX_PORT", "7000")
    monkeypatch.setenv("CHATTERBOX_FLOW_STEPS", "3")
    settings = settings_from_args(build_parser().parse_args(["serve", "--port", "7001"]))
    assert (settings.port, settings.flow_steps) == (7001, 3)


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().out


def test_models_and_aliases_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CHATTERBOX_"):
            monkeypatch.delenv(key)
    args = ["serve", "--models", "chatterbox-turbo,chatterbox", "--model-aliases", "house=chatterbox-turbo"]
    settings = settings_from_args(build_parser().parse_args(args))
    assert settings.models == ("chatterbox-turbo", "chatterbox")
    assert settings.model_aliases == ("house=chatterbox-turbo",)
    assert Settings().models == ("chatterbox",)  # the default start loads only the original


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--models", "chatterbox,chatterbox-xl"], "each of chatterbox, chatterbox-turbo, chatterbox-multilingual"),
        (["--models", "chatterbox", "--model-aliases", "tts-1=chatterbox-turbo"], "not loaded"),
    ],
)
def test_unknown_models_or_aliases_fail_fast_without_traceback(flags: list[str], expected: str) -> None:
    result = run_cli("serve", "--engine", "fake", *flags)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_invalid_setting_fails_fast_without_traceback() -> None:
    result = run_cli("serve", "--engine", "fake", env={"CHATTERBOX_PORT": "99999"})
    assert result.returncode == 2
    assert "port" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--load-format", "local"], {}, "--model-path"),
        (["--load-format", "local", "--model-path", "/nonexistent/weights"], {}, "not a directory"),
        (["--load-format", "hub"], {"HF_HUB_OFFLINE": "1"}, "chatterbox-gateway download"),
    ],
)
def test_serve_without_weights_fails_fast_with_what_to_do(tmp_path: Path, args: list[str], env: dict[str, str], expected: str) -> None:
    started = time.monotonic()
    result = run_cli("serve", "--engine", "reference", "--cache-dir", str(tmp_path), *args, env=env)
    assert result.returncode == 2, result
    assert expected in result.stderr
    assert "--load-format dummy" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_openapi_command_writes_the_committed_document(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "openapi.json"
    result = run_cli("openapi", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == openapi_json()
    assert json.loads(out.read_text())["info"]["title"] == "chatterbox-gateway"


# --- the README, verbatim, against `chatterbox-gateway serve` -----------------------------------


@pytest.fixture
def cli_server(tmp_path: Path):
    """`chatterbox-gateway serve --engine fake --port PORT` as a user would start it."""
    with cli_serve(["--engine", "fake", "--cache-dir", str(tmp_path / "cache")], tmp_path) as run:
        yield int(run.base_url.rsplit(":", 1)[1])
    process, output = run.process, run.output
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    # the logs are JSON lines (stdout is not a terminal), each with the request id bound
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    assert requests and all(line.get("request_id") for line in requests)


CURL = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def readme_block(starts_with: str) -> str:
    """The README's code block (or line) that starts with ``starts_with``, exactly as written."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for block in readme.split("```")[1::2]:
        body = block.split("\n", 1)[1] if "\n" in block else block  # drop the language tag
        for line_no, line in enumerate(body.splitlines()):
            if line.startswith(starts_with):
                return line if starts_with.startswith("curl") else "\n".join(body.splitlines()[line_no:])
    raise AssertionError(f"the README has no code starting with {starts_with!r}")


def on_port(text: str, port: int) -> str:
    assert "127.0.0.1:8000" in text  # the README's documented address
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")


@CURL
def test_readme_curl(cli_server: int, tmp_path: Path, valid_audio) -> None:
    command = on_port(readme_block("curl -sS http://127.0.0.1:8000/v1/audio/speech"), cli_server)
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    valid_audio((tmp_path / "out.mp3").read_bytes(), "mp3")


def test_readme_python_sdk(cli_server: int, tmp_path: Path, valid_audio) -> None:
    snippet = on_port(readme_block("from openai import OpenAI"), cli_server)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    valid_audio((tmp_path / "speech.mp3").read_bytes(), "mp3")


def test_serve_help_describes_every_flag_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {action.dest: action for action in serve._actions if action.dest in Settings.__struct_fields__}
    assert set(flags) == set(Settings.__struct_fields__)
    undocumented = [name for name, action in flags.items() if not (action.help or "").split("(default:")[0].strip()]
    assert undocumented == []
    assert not [name for name, action in flags.items() if "`" in (action.help or "")]
    # a default computed at start-up is shown too
    assert "(default: /somewhere/cache/chatterbox-gateway)" in flags["cache_dir"].help


@CURL
def test_readme_voice_upload(cli_server: int, tmp_path: Path, valid_audio) -> None:
    """The upload as written, from the clone (its clip is one of the built-in voices), then
    the new voice by name through the SDK."""
    command = on_port(readme_block("curl -sS http://127.0.0.1:8000/v1/audio/voices"), cli_server)
    result = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    voice = json.loads(result.stdout)
    assert voice["name"] == "my-voice" and voice["id"].startswith("voice_"), voice
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cli_server}/v1", api_key="unused", max_retries=0)
    speech = client.audio.speech.create(model="tts-1", voice="my-voice", input="Hello", response_format="wav")
    valid_audio(speech.content, "wav")
