"""The playground: a page at ``/`` to hear the server before writing code.

Plain HTML, CSS and JavaScript shipped in the package (``static/``), no build step and nothing
fetched from elsewhere at run time; the page talks to the same ``/v1`` API as any client, with
the API key the user types (kept in the tab's sessionStorage). Turned off by
``playground_enabled=false``.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.router import Router
from litestar.static_files import create_static_files_router

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/playground/static"

# The page loads only its own files and talks only to this server; a stray external URL in
# the page is blocked (and shows up as a console error in the browser tests).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; media-src 'self' blob: mediastream:; "
    "connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'"
)


def playground_routes() -> list[HTTPRouteHandler | Router]:
    """The page at ``/`` and its files under ``/playground/static/``."""
    page = (STATIC_DIR / "index.html").read_bytes()

    @get("/", include_in_schema=False, sync_to_thread=False, name="playground")
    def playground() -> Response[bytes]:
        return Response(
            content=page,
            media_type="text/html",  # Litestar adds the charset
            headers={"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY},
        )

    static = create_static_files_router(path=STATIC_PATH, directories=[STATIC_DIR], name="playground-static")
    return [playground, static]
