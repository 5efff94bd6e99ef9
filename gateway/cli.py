"""The ``chatterbox-gateway`` command (also ``python -m gateway``).

- ``serve``: start the server. Every setting is a flag (``--load-format dummy``, ``--port``,
  ...) over the ``CHATTERBOX_*`` environment. Weights are checked before anything starts, so
  a machine without Hub access fails at once with a message saying what to do.
- ``download``: fetch the pinned weights of every model in ``--models`` into the cache ahead of time.
- ``openapi``: write the OpenAPI document (no engine, no lifespan).
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway import __version__
from gateway import settings as settings_module
from gateway.errors import WeightsUnavailableError
from gateway.settings import Settings, SettingsError, load_settings

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except (SettingsError, WeightsUnavailableError) as exc:
        # What the user must change: one clear line, no traceback.
        print(f"chatterbox-gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatterbox-gateway", description="OpenAI-compatible text-to-speech server for Chatterbox."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the server. Flags override CHATTERBOX_* environment variables.",
    )
    _add_settings_flags(serve)
    serve.set_defaults(run=_serve)

    download = commands.add_parser("download", help="download the model weights into the cache")
    _add_settings_flags(download)
    download.set_defaults(run=_download)

    openapi = commands.add_parser("openapi", help="write the OpenAPI document (JSON)")
    openapi.add_argument("--output", "-o", default="-", help="file to write, '-' for stdout (default)")
    openapi.set_defaults(run=_openapi)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name in Settings.__struct_fields__}
    return load_settings(overrides=overrides)


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    _check_weights(settings)
    from gateway.http.tls import load_tls_context

    load_tls_context(settings)  # an unreadable certificate or key fails here, not after the engine loaded

    from gateway.app import create_app
    from gateway.observability.logging import configure_logging

    configure_logging(settings)
    engine = None
    if settings.cluster:
        from gateway.cluster.remote_engine import build_remote_engine

        engine = build_remote_engine(settings)
    run_server(create_app(settings, engine=engine), settings)
    return 0


def run_server(app: Any, settings: Settings) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; then stop accepting, give open requests
    ``shutdown_grace_s`` in total to finish (the rest are dropped), and run the app's shutdown.

    The soft open-files limit is raised to the hard one first: connections are capped below
    it (``gateway.server.http_server``), so running out of descriptors means refusals; the
    GIL's switch interval is ``gil_switch_interval_ms`` when that is set, and CUDA allocations
    are recorded from here on when ``cuda_memory_snapshots`` is."""
    from gateway.http.connection_limits import raise_descriptor_limit
    from gateway.server.http_server import GatewayServer, install_accept_log_limit, server_config

    raise_descriptor_limit()
    install_accept_log_limit()
    if settings.gil_switch_interval_ms > 0:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    if settings.cuda_memory_snapshots:  # before the app starts: the engines' allocations too
        from gateway.observability.cuda_memory import Recorder

        Recorder(Path(settings.cuda_memory_snapshots)).start()
    GatewayServer(server_config(app, settings)).run()


def _check_weights(settings: Settings) -> None:
    """Fail before the server starts when the configured weights (or, in cluster mode, Ray
    Serve and the replica bounds) cannot be had."""
    if settings.cluster:
        from gateway.cluster.options import check_cluster_settings

        check_cluster_settings(settings)
    if settings.engine == "fake" or settings.cluster not in (None, "local"):
        return  # the engine replicas load the weights on their own nodes
    from gateway.engine.checkpoint.weights import resolve_weights
    from gateway.models.families import FAMILIES

    for name in settings.models:
        resolve_weights(settings, FAMILIES[name])


def _download(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from gateway.engine.checkpoint.weights import download_weights

    for path in download_weights(settings):
        print(path)
    return 0


def _openapi(args: argparse.Namespace) -> int:
    text = openapi_json()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def openapi_json() -> str:
    """The OpenAPI document of an app built with default settings (independent of the
    environment, so the committed file is reproducible anywhere)."""
    from gateway.app import create_app

    app = create_app(Settings())
    return json.dumps(app.openapi_schema.to_schema(), indent=2, ensure_ascii=False) + "\n"


# --- one flag per setting ---------------------------------------------------------------------


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also CHATTERBOX_<NAME> in the environment)")
    hints = typing.get_type_hints(Settings, include_extras=True)
    docs = _field_docs()
    fields = {f.name: f for f in msgspec.structs.fields(Settings)}
    for name in Settings.__struct_fields__:
        flag = "--" + name.replace("_", "-")
        base, choices = _flag_type(hints[name])
        help_text = docs.get(name, "")
        field = fields[name]
        default = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
        if default is not msgspec.NODEFAULT and default is not None and default != ():
            help_text = f"{help_text} (default: {default})".strip()
        help_text = help_text.replace("%", "%%")
        # default=None everywhere: a flag that is not given leaves the environment's value.
        if base is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif base is tuple:
            group.add_argument(flag, dest=name, type=_comma_list, default=None, metavar="A,B", help=help_text)
        else:
            group.add_argument(flag, dest=name, type=base, choices=choices, default=None, help=help_text)


def _flag_type(hint: Any) -> tuple[Any, list[Any] | None]:
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _flag_type(options[0])
    if origin is Literal:
        choices = list(typing.get_args(hint))
        return type(choices[0]), choices
    if origin is tuple or hint is tuple:
        return tuple, None
    return hint, None


def _comma_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@functools.cache
def _field_docs() -> dict[str, str]:
    """The attribute docstrings of Settings (the string right under a field), for --help."""
    tree = ast.parse(inspect.getsource(settings_module))
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            body = node.body
            for current, following in zip(body, body[1:]):
                if (
                    isinstance(current, ast.AnnAssign)
                    and isinstance(current.target, ast.Name)
                    and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                ):
                    # reStructuredText ``literals`` read as plain words on a terminal
                    docs[current.target.id] = " ".join(following.value.value.replace("``", "").split())
    return docs
