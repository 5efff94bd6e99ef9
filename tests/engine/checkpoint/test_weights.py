"""Weights: local validation, the Hub cache found offline, fast failure without the Hub, the
dummy tokenizer. No model is built here (the dummy checkpoint is covered in test_reference)."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import pytest

from gateway.engine.checkpoint.layout import CHECKPOINT_FILES
from gateway.engine.checkpoint.weights import (
    cached_snapshot,
    download_weights,
    model_identity,
    resolve_weights,
)
from gateway.errors import WeightsUnavailableError
from gateway.settings import Settings
from ops_support import quiet_attempts

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"), hf_revision=REVISION, **kw)  # type: ignore[arg-type]


def _write_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        (directory / name).write_bytes(name.encode())
    return directory


def _assert_says_what_to_do(message: str) -> None:
    assert "chatterbox-gateway download" in message
    assert "--model-path" in message
    assert "--load-format dummy" in message


def test_checkpoint_files_are_what_upstream_fetches() -> None:
    from chatterbox.tts import ChatterboxTTS

    source = inspect.getsource(ChatterboxTTS.from_pretrained)
    for name in CHECKPOINT_FILES:
        assert f'"{name}"' in source


def test_dummy_needs_no_weights(tmp_path: Path) -> None:
    assert resolve_weights(_settings(tmp_path, load_format="dummy")) is None


def test_local_directory_is_validated(tmp_path: Path) -> None:
    directory = _write_checkpoint(tmp_path / "ckpt")
    settings = _settings(tmp_path, load_format="local", model_path=str(directory))
    assert resolve_weights(settings) == directory.resolve()

    (directory / "s3gen.safetensors").unlink()
    (directory / "conds.pt").unlink()
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights(settings)
    assert "s3gen.safetensors" in str(info.value) and "conds.pt" in str(info.value)
    assert "t3_cfg.safetensors" not in str(info.value).split("lacks")[1].split(".")[0]
    _assert_says_what_to_do(str(info.value))


def test_local_without_a_path_or_with_a_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="--model-path"):
        resolve_weights(_settings(tmp_path, load_format="local"))
    file = tmp_path / "not-a-dir"
    file.write_text("x")
    with pytest.raises(WeightsUnavailableError, match="not a directory"):
        resolve_weights(_settings(tmp_path, load_format="local", model_path=str(file)))


def test_hub_snapshot_in_the_cache_is_used_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = _settings(tmp_path, load_format="hub", hf_repo="someone/chatterbox-copy")
    snapshot = tmp_path / "cache" / "hub" / "models--someone--chatterbox-copy" / "snapshots" / REVISION
    _write_checkpoint(snapshot)
    assert cached_snapshot(settings) == snapshot
    assert resolve_weights(settings) == snapshot.resolve()
    assert download_weights(settings) == [snapshot]

    (snapshot / "tokenizer.json").unlink()  # incomplete snapshot: not used
    assert cached_snapshot(settings) is None
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        resolve_weights(settings)


def test_hub_offline_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for _ in quiet_attempts():  # "at once" is wall time: a stalled host measures again
        started = time.monotonic()
        with pytest.raises(WeightsUnavailableError) as info:
            resolve_weights(_settings(tmp_path, load_format="hub"))
        took = time.monotonic() - started
    assert took < 2, took
    _assert_says_what_to_do(str(info.value))
    with pytest.raises(WeightsUnavailableError):
        download_weights(_settings(tmp_path, load_format="dummy"))


def test_unreachable_hub_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub that refuses connections (a closed local port) must not cost minutes of retries."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights(_settings(tmp_path, load_format="hub"))
    assert time.monotonic() - started < 30
    assert "cannot download ResembleAI/chatterbox@" in str(info.value)
    _assert_says_what_to_do(str(info.value))


def test_real_hub_endpoint_fails_fast_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real endpoint: unreachable here (DNS fails), and the repo does not exist where it is
    reachable, so this never downloads anything and must fail within seconds either way."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    settings = _settings(tmp_path, load_format="hub", hf_repo="chatterbox-gateway-tests/no-such-model")
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights(settings)
    assert time.monotonic() - started < 30
    _assert_says_what_to_do(str(info.value))


def test_model_identity(tmp_path: Path) -> None:
    assert model_identity(_settings(tmp_path, load_format="dummy", dummy_seed=3)) == "dummy-seed3"
    assert model_identity(_settings(tmp_path, load_format="hub")) == f"ResembleAI/chatterbox@{REVISION}"
    directory = _write_checkpoint(tmp_path / "ckpt")
    local = _settings(tmp_path, load_format="local", model_path=str(directory))
    first = model_identity(local)
    assert first.startswith(f"local:{directory.resolve()}#") and model_identity(local) == first
    (directory / "t3_cfg.safetensors").write_bytes(b"other weights")
    assert model_identity(local) != first


def test_dummy_tokenizer_is_a_valid_english_vocabulary(tmp_path: Path) -> None:
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.tokenizers import EnTokenizer

    from gateway.engine.checkpoint.dummy import tokenizer_json

    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer_json(), encoding="utf-8")
    tokenizer = EnTokenizer(str(path))
    vocab = tokenizer.tokenizer.get_vocab()
    hp = T3Config.english_only()
    assert len(vocab) == hp.text_tokens_dict_size == 704
    assert vocab["[START]"] == hp.start_text_token and vocab["[STOP]"] == hp.stop_text_token
    ids = tokenizer.encode("Hello there, world!")
    assert vocab["[SPACE]"] in ids and vocab["[UNK]"] not in ids
    assert max(ids) < 704
    assert tokenizer.decode(ids) == "Hello there, world!"
    assert vocab["[UNK]"] in tokenizer.encode("ü")


def test_each_family_finds_its_own_pinned_snapshot_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.models.families import FAMILIES

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = _settings(tmp_path, load_format="hub", models=("chatterbox-turbo", "chatterbox-multilingual"))
    turbo, mtl = FAMILIES["chatterbox-turbo"], FAMILIES["chatterbox-multilingual"]
    hub = tmp_path / "cache" / "hub"
    turbo_dir = hub / "models--ResembleAI--chatterbox-turbo" / "snapshots" / turbo.hub_revision
    turbo_dir.mkdir(parents=True)
    for name in turbo.checkpoint_files:
        (turbo_dir / name).write_bytes(b"x")
    assert resolve_weights(settings, turbo) == turbo_dir.resolve()
    # Multilingual lives in the original's repository at its own pinned revision: not cached here
    with pytest.raises(WeightsUnavailableError, match=f"ResembleAI/chatterbox@{mtl.hub_revision}"):
        resolve_weights(settings, mtl)
    (turbo_dir / "s3gen_meanflow.safetensors").unlink()
    assert cached_snapshot(settings, turbo) is None


def test_local_families_need_their_own_directories_and_files(tmp_path: Path) -> None:
    from gateway.models.families import FAMILIES

    turbo = FAMILIES["chatterbox-turbo"]
    with pytest.raises(WeightsUnavailableError, match="--turbo-model-path"):
        resolve_weights(_settings(tmp_path, load_format="local"), turbo)
    directory = _write_checkpoint(tmp_path / "turbo")  # the original's files are not Turbo's
    with pytest.raises(WeightsUnavailableError, match="t3_turbo_v1.safetensors"):
        resolve_weights(_settings(tmp_path, load_format="local", turbo_model_path=str(directory)), turbo)


def test_families_have_distinct_identities(tmp_path: Path) -> None:
    from gateway.models.families import FAMILIES

    for load_format in ("dummy", "hub"):
        settings = _settings(tmp_path, load_format=load_format)
        identities = {model_identity(settings, family) for family in FAMILIES.values()}
        assert len(identities) == 3
        assert model_identity(settings) == model_identity(settings, FAMILIES["chatterbox"])
