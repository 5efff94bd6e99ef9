"""The OpenAPI document and its two browsable renderings, with every asset served from here.

Litestar's render plugins load their scripts, styles, fonts and favicon from CDNs by default,
which leaves the pages blank on a machine without internet. Here Swagger UI and ReDoc load
the copies shipped in ``api_docs_assets/`` (taken unmodified from the npm packages named in
``api_docs_assets/VERSIONS``, with their licences), served under ``/schema/assets/``. RapiDoc
and Stoplight Elements are left out: two renderings are enough, and each is megabytes.

Pages: ``/schema`` (ReDoc), ``/schema/redoc``, ``/schema/swagger``, ``/schema/openapi.json``,
``/schema/openapi.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.router import Router
from litestar.static_files import create_static_files_router

ASSETS_DIR = Path(__file__).resolve().parent / "api_docs_assets"
ASSETS_PATH = "/schema/assets"
# an empty icon: the browser asks for no /favicon.ico, and the pages need nothing from the playground
FAVICON = "<link rel='icon' href='data:,'>"


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """ReDoc first: it is served at the schema root too (Litestar's default page)."""
    return [
        RedocRenderPlugin(js_url=f"{ASSETS_PATH}/redoc.standalone.js", google_fonts=False, favicon=FAVICON),
        SwaggerRenderPlugin(
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
            favicon=FAVICON,
        ),
        JsonRenderPlugin(),
        YamlRenderPlugin(),
    ]


def api_docs_assets() -> Router:
    return create_static_files_router(path=ASSETS_PATH, directories=[ASSETS_DIR], name="api-docs-assets")
