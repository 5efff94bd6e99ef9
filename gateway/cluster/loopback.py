"""A local Ray instance that nothing outside this machine can reach (``cluster_loopback_only``).

Measured with Ray 2.60: a Ray instance started by ``ray.init()`` listens on every interface
(``::`` and ``0.0.0.0``: GCS, raylet, object manager, workers, dashboard and runtime-env
agents), and every Serve replica opens an inter-deployment gRPC server on ``[::]:0``. Two
switches bring all of it onto loopback:

- :func:`keep_ray_on_loopback` (the process that starts Ray, before it does): Ray's own
  switch for machines without clusters (macOS, Windows: ``ENABLE_RAY_CLUSTER``) makes the
  node address 127.0.0.1, and Ray then binds its servers to the node address. It is read from
  the environment when Ray is imported and by every Ray process when it starts.
- :func:`keep_replica_grpc_on_loopback` (each engine replica, as it starts): Serve's
  inter-deployment server has no setting; on a loopback node it is bound to the node address
  instead of ``[::]`` (nothing could use it from elsewhere, as no other node can join).

``tests/cluster/test_cluster_cli.py`` lists the sockets every process of a ``serve --cluster
local`` listens on.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any

LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_ANY_ADDRESS = ("[::]:0", "0.0.0.0:0", "[::]", "0.0.0.0")


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def keep_ray_on_loopback() -> None:
    """The Ray instance this process starts gets 127.0.0.1 as its node address (see the
    module docstring); an already imported Ray gets the same value set on its constants."""
    os.environ[LOCAL_ONLY_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def keep_replica_grpc_on_loopback() -> bool:
    """In a Serve replica on a loopback node: bind Serve's inter-deployment gRPC server to the
    node address, not ``[::]``. True when the replica is on such a node (and the bind is
    redirected); a Ray without that hook is left as it is."""
    import ray

    node = ray.util.get_node_ip_address()
    if not is_loopback(node):
        return False
    try:
        from ray.serve._private import replica as serve_replica

        bind = serve_replica.add_port_to_grpc_server
    except (ImportError, AttributeError):
        return False

    def on_the_node(server: Any, address: str) -> int:
        if address in _ANY_ADDRESS:
            address = f"{node}:0"
        return int(bind(server, address))

    serve_replica.add_port_to_grpc_server = on_the_node
    return True
