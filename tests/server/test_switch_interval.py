"""``gil_switch_interval_ms``: ``serve`` sets the GIL's switch interval before it serves."""

from __future__ import annotations

import sys

import pytest

from gateway import cli
from gateway.settings import SettingsError, load_settings


class _Server:
    seen: list[float] = []

    def __init__(self, config) -> None:  # noqa: ANN001 - GatewayServer's (uvicorn's)
        pass

    def run(self) -> None:
        _Server.seen.append(sys.getswitchinterval())


@pytest.mark.parametrize(("ms", "expected_s"), [(0.5, 0.0005), (0.0, None)])
def test_serve_sets_the_switch_interval_the_setting_names(monkeypatch, ms: float, expected_s: float | None) -> None:
    monkeypatch.setattr("gateway.server.http_server.GatewayServer", _Server)
    monkeypatch.setattr("gateway.http.connection_limits.raise_descriptor_limit", lambda: None)
    before = sys.getswitchinterval()
    _Server.seen.clear()
    try:
        cli.run_server(object(), load_settings(environ={}, overrides={"gil_switch_interval_ms": ms}))
        assert _Server.seen == [pytest.approx(before if expected_s is None else expected_s)]
    finally:
        sys.setswitchinterval(before)


def test_the_switch_interval_is_bounded() -> None:
    for bad in (-1.0, 101.0):
        with pytest.raises(SettingsError):
            load_settings(environ={}, overrides={"gil_switch_interval_ms": bad})
