"""The playground route without a browser: on by default, off by setting, open without a key
(its files and the API docs pages too) while /v1 still needs one."""

from __future__ import annotations

import msgspec
import pytest

from gateway.engine.fake import FakeEngine
from gateway.settings import Settings
from harness import in_process

KEY = "sk-page"
PAGE_FILES = ["/", "/playground/static/main.js", "/playground/static/playground.css", "/playground/static/favicon.svg"]
DOCS_FILES = ["/schema", "/schema/swagger", "/schema/redoc", "/schema/assets/swagger-ui-bundle.js",
              "/schema/assets/redoc.standalone.js", "/schema/openapi.json"]


async def test_page_and_docs_load_without_a_key_while_v1_needs_one(settings: Settings) -> None:
    keyed = msgspec.structs.replace(settings, api_keys=(KEY,))
    async with in_process(keyed, FakeEngine()) as gw:
        for path in PAGE_FILES + DOCS_FILES:
            answer = await gw.http.get(path)
            assert answer.status_code == 200, (path, answer.status_code)
        assert (await gw.http.get("/v1/models")).status_code == 401
        assert (await gw.http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200


async def test_page_is_html_that_may_load_only_its_own_files(settings: Settings) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        page = await gw.http.get("/")
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "connect-src 'self'" in policy
        assert "http://" not in page.text and "https://" not in page.text
        script = await gw.http.get("/playground/static/main.js")
        assert "javascript" in script.headers["content-type"]


async def test_every_page_file_is_served_and_names_no_other_host(settings: Settings) -> None:
    from gateway.http.playground import STATIC_DIR, STATIC_PATH

    files = sorted(path.name for path in STATIC_DIR.iterdir())
    assert {"main.js", "speak.js", "player.js", "sse.js", "models.js"} <= set(files)
    async with in_process(settings, FakeEngine()) as gw:
        for name in files:
            answer = await gw.http.get(f"{STATIC_PATH}/{name}")
            assert answer.status_code == 200, name
            text = answer.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
            assert "http://" not in text and "https://" not in text, name


@pytest.mark.parametrize("path", ["/schema/swagger", "/schema/redoc"])
async def test_docs_pages_name_no_other_host(settings: Settings, path: str) -> None:
    async with in_process(settings, FakeEngine()) as gw:
        html = (await gw.http.get(path)).text
        head = html[: html.index("<body")]
        assert "https://" not in head and "http://" not in head, head
        assert "/schema/assets/" in head


async def test_playground_can_be_turned_off(settings: Settings) -> None:
    off = msgspec.structs.replace(settings, playground_enabled=False)
    async with in_process(off, FakeEngine()) as gw:
        for path in PAGE_FILES:
            assert (await gw.http.get(path)).status_code == 404, path
        assert (await gw.http.get("/schema/swagger")).status_code == 200  # the API docs stay
