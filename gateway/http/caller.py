"""Who is asking: the client (its network address) and the API key (a stable id, never the key).

The API-key middleware (``gateway.http.auth``) decides both once per request and leaves a
:class:`Caller` in the request scope. Speech admission counts requests per client and per
key (fair shares, ``gateway.speech.admission``); the voice library shows each key the voices
it created (``gateway.voices.library``).

- **client**: the connection's peer address; behind a reverse proxy listed in
  ``trusted_proxies``, the address its ``X-Forwarded-For`` names (uvicorn's proxy-headers
  middleware rewrites the peer, only for those proxies; with none listed the header is
  ignored, so a client cannot pick its own identity). An IPv6 address counts as its /64
  (one host usually holds a whole /64); an IPv4-mapped IPv6 address as the IPv4 address.
- **key id**: ``key_`` and 16 hex digits of SHA-256 over a fixed prefix and the key: the same
  in every process and after restarts (it is stored as a created voice's owner), and useless
  for calling the API. Logged and stored instead of the key.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from gateway.voices.library import VoiceAccess

CALLER_STATE = "caller"
"""Key of the :class:`Caller` in the request scope's ``state``."""

IPV6_CLIENT_PREFIX = 64
_KEY_ID_PREFIX = b"chatterbox-gateway api key id\x00"
_MAX_CLIENT_CHARS = 64


@dataclass(frozen=True, slots=True)
class Caller:
    client: str
    """The client's address (see the module docstring)."""
    key_id: str | None
    """The API key's id; None when the server has no keys (or the route needs none)."""
    admin: bool = False
    """The key is one of ``admin_api_keys``."""
    keys_enforced: bool = False
    """The server has API keys configured."""

    @property
    def voices(self) -> VoiceAccess:
        """Which created voices this caller sees: all of them on a server without keys (as
        before keys existed) and for an admin key; else the shared ones and its own."""
        if not self.keys_enforced:
            return VoiceAccess(owner=None, everything=True)
        return VoiceAccess(owner=self.key_id, everything=self.admin)


def key_id(key: bytes) -> str:
    return "key_" + hashlib.sha256(_KEY_ID_PREFIX + key).hexdigest()[:16]


def client_id(peer: Any) -> str:
    """The client's identity from the ASGI scope's ``client`` ((host, port) or None)."""
    host = peer[0] if isinstance(peer, (tuple, list)) and peer else None
    if not isinstance(host, str) or not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host[:_MAX_CLIENT_CHARS]  # e.g. a unix socket path: one client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


def caller_of(scope: Any) -> Caller:
    """The request's caller, as the API-key middleware recorded it."""
    caller = scope.get("state", {}).get(CALLER_STATE)
    if not isinstance(caller, Caller):
        raise RuntimeError("no caller in the request scope: the API-key middleware did not run")
    return caller


def remember_caller(scope: Any, caller: Caller) -> None:
    scope.setdefault("state", {})[CALLER_STATE] = caller
