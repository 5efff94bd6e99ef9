from pathlib import Path

import pytest

from gateway.settings import DEFAULT_HF_REVISION, Settings, SettingsError, load_settings


def test_defaults_need_no_environment():
    s = load_settings({})
    assert s == Settings(cache_dir=s.cache_dir)
    assert s.load_format == "hub"
    assert len(DEFAULT_HF_REVISION) == 40  # a pinned commit, not a branch name


def test_environment_values_are_typed():
    s = load_settings(
        {
            "CHATTERBOX_PORT": "9001",
            "CHATTERBOX_WATERMARK": "false",
            "CHATTERBOX_API_KEYS": "k1, k2,,",
            "CHATTERBOX_FLOW_STEPS": "3",
            "UNRELATED": "x",
        }
    )
    assert s.port == 9001
    assert s.watermark is False
    assert s.api_keys == ("k1", "k2")
    assert s.flow_steps == 3


def test_cli_overrides_win_over_environment():
    s = load_settings({"CHATTERBOX_PORT": "9001"}, {"port": 9002, "engine": None})
    assert s.port == 9002
    assert s.engine == "auto"  # None means "flag not given"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"CHATTERBOX_PORT": "http"}, "port"),
        ({"CHATTERBOX_FLOW_STEPS": "0"}, "flow_steps"),
        ({"CHATTERBOX_LOAD_FORMAT": "magic"}, "load_format"),
    ],
)
def test_bad_values_name_the_setting(env, name):
    with pytest.raises(SettingsError, match=name):
        load_settings(env)


def test_api_keys_file_is_merged(tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n\n", encoding="utf-8")
    s = load_settings({"CHATTERBOX_API_KEYS": "env-key", "CHATTERBOX_API_KEYS_FILE": str(keys)})
    assert s.all_api_keys() == frozenset({"env-key", "file-key"})


def test_voice_dirs_default_under_cache_and_repo(tmp_path: Path):
    s = load_settings({"CHATTERBOX_CACHE_DIR": str(tmp_path)})
    assert s.resolved_voices_dir() == tmp_path / "voices"
    assert (s.resolved_builtin_voices_dir() / "manifest.json").name == "manifest.json"


def test_elevenlabs_settings_from_the_environment_and_checked():
    s = load_settings(
        {
            "CHATTERBOX_MODELS": "chatterbox,chatterbox-turbo",
            "CHATTERBOX_ELEVENLABS_MODEL_ALIASES": "eleven_v3=chatterbox-turbo, my-id=chatterbox",
            "CHATTERBOX_ELEVENLABS_MAX_CONTEXTS": "3",
        }
    )
    assert s.elevenlabs_model_aliases == ("eleven_v3=chatterbox-turbo", "my-id=chatterbox")
    assert s.elevenlabs_max_contexts == 3 and s.elevenlabs_enabled
    with pytest.raises(SettingsError, match="not loaded"):
        load_settings({"CHATTERBOX_ELEVENLABS_MODEL_ALIASES": "eleven_v3=chatterbox-multilingual"})
    with pytest.raises(SettingsError, match="elevenlabs_max_message_bytes"):
        load_settings({"CHATTERBOX_ELEVENLABS_MAX_MESSAGE_BYTES": "10"})


def test_the_body_budget_must_hold_one_largest_body() -> None:
    with pytest.raises(SettingsError, match="max_pending_body_bytes"):
        load_settings({"CHATTERBOX_MAX_PENDING_BODY_BYTES": "1048576"}, [])
