"""The page watcher's rule for failed requests: only an abort that the test's own
navigation caused is forgiven (CI once failed on the favicon cut off by a reload)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from browser_support import Watched


@dataclass(eq=False)
class Request:
    url: str
    failure: str | None = None


def _started(watched: Watched, url: str) -> Request:
    request = Request(url)
    watched.started_at[request] = watched.navigations
    return request


def _failed(watched: Watched, request: Request, failure: str) -> None:
    request.failure = failure
    watched.request_failed(request)


def test_an_abort_caused_by_the_tests_reload_is_forgiven() -> None:
    watched = Watched(page=_Page(), origin="http://127.0.0.1:1")
    favicon = _started(watched, "http://127.0.0.1:1/playground/static/favicon.svg")
    watched.reload()
    _failed(watched, favicon, "net::ERR_ABORTED")
    assert watched.problems() == []


def test_other_failures_are_problems() -> None:
    watched = Watched(page=_Page(), origin="http://127.0.0.1:1")
    aborted_before = _started(watched, "http://127.0.0.1:1/a")
    _failed(watched, aborted_before, "net::ERR_ABORTED")  # no navigation cut it off
    refused = _started(watched, "http://127.0.0.1:1/b")
    watched.reload()
    _failed(watched, refused, "net::ERR_CONNECTION_REFUSED")  # in flight at the reload, but not an abort
    after = _started(watched, "http://127.0.0.1:1/c")
    _failed(watched, after, "net::ERR_ABORTED")  # started after the reload
    assert watched.problems() == [
        "http://127.0.0.1:1/a: net::ERR_ABORTED",
        "http://127.0.0.1:1/b: net::ERR_CONNECTION_REFUSED",
        "http://127.0.0.1:1/c: net::ERR_ABORTED",
    ]


class _Page:
    reloads = 0

    def reload(self) -> Any:
        self.reloads += 1
