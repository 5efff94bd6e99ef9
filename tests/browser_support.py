"""Headless Chromium for the page tests: the distribution's browser driven by Playwright.

Nothing is downloaded: Playwright starts the system browser (``/usr/bin/chromium``, from
``apt-get install chromium``; ``CHATTERBOX_TEST_CHROMIUM`` overrides). Without it the
browser tests skip, unless ``CHATTERBOX_REQUIRE_BROWSER=1`` (CI) makes that a failure.

Every page is watched: console errors, uncaught exceptions, failed requests and any request
that leaves the server under test are recorded, and requests to other hosts are refused, so
a page that would fetch something from the internet fails here even on a machine online.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = os.environ.get("CHATTERBOX_TEST_CHROMIUM", "/usr/bin/chromium")


def launch_browser() -> Iterator[Any]:
    """A fixture body: yields a Playwright Browser, or skips (fails under CI) without one."""
    required = os.environ.get("CHATTERBOX_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("the playwright wheel is not installed")
    if not Path(CHROMIUM).is_file():
        if required:
            pytest.fail(f"no browser at {CHROMIUM} (apt-get install chromium)")
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start. The fake
        # capture device is a microphone that plays a beep, granted without a prompt.
        args = ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watched:
    page: Any
    origin: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    # how many times the test has navigated this page away; each request remembers the count
    # at its start, so one that a navigation cut off (net::ERR_ABORTED) is told from a failure
    navigations: int = 0
    started_at: dict[Any, int] = field(default_factory=dict)

    def reload(self) -> None:
        """Reload the page. A request still in flight (the favicon, say) is aborted by the
        browser; that abort is the test's doing, not the page's, and is not a problem."""
        self.navigations += 1
        self.page.reload()

    def request_failed(self, request: Any) -> None:
        if request.url in self.foreign_requests or request.url.startswith("blob:"):
            return
        cut_off = self.started_at.pop(request, self.navigations) < self.navigations
        if cut_off and request.failure == "net::ERR_ABORTED":
            return
        self.failed_requests.append(f"{request.url}: {request.failure}")

    def problems(self, *, allow_console: tuple[str, ...] = ()) -> list[str]:
        console = [text for text in self.console_errors if not any(part in text for part in allow_console)]
        return console + self.failed_requests + self.foreign_requests

    def fits_and_shoot(self, path: Path) -> None:
        """The page is no wider than the window (nothing scrolls sideways), and a full-page
        screenshot of it goes to ``path`` (for a person to look at when a test fails)."""
        width = self.page.viewport_size["width"]
        scroll_width = self.page.evaluate("document.documentElement.scrollWidth")
        self.page.screenshot(path=str(path), full_page=True)
        assert scroll_width <= width, f"the page is {scroll_width} px wide in a {width} px window (see {path})"

    def wait_js(self, expression: str, timeout_s: float = 20.0) -> Any:
        """Poll a JS expression until truthy. (Playwright's wait_for_function evaluates a
        string, which the playground's Content-Security-Policy forbids, as it should.)"""
        deadline = time.monotonic() + timeout_s
        while not (value := self.page.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout_s} s: {expression}; problems: {self.problems()}")
            time.sleep(0.05)
        return value


VIEWPORTS: dict[str, dict[str, Any]] = {
    "desktop": {"viewport": {"width": 1280, "height": 900}},
    # a phone: 390 CSS pixels wide (iPhone 12 to 15), the page's meta viewport honoured
    "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 2},
}


def watched_page(browser: Any, origin: str, size: str = "desktop", **context_options: Any) -> Watched:
    context = browser.new_context(**VIEWPORTS[size], **context_options)
    page = context.new_page()
    watched = Watched(page=page, origin=origin)

    def route(route: Any) -> None:
        url = route.request.url
        if url.startswith(("blob:", "data:")) or urlsplit(url)._replace(path="", query="", fragment="").geturl() == origin:
            route.continue_()
        else:
            watched.foreign_requests.append(url)
            route.abort()

    page.route("**/*", route)
    page.on("console", lambda message: message.type == "error" and watched.console_errors.append(message.text))
    page.on("pageerror", lambda error: watched.console_errors.append(f"uncaught: {error}"))
    page.on("request", lambda request: watched.started_at.__setitem__(request, watched.navigations))
    page.on("requestfinished", lambda request: watched.started_at.pop(request, None))
    page.on("requestfailed", watched.request_failed)
    return watched
