"""Names and addresses as the configuration and the wire spell them.

A node id names a node in certificates, the roster and every file; an
address is where an agent listens. Both are checked the same way wherever
they come from (a command line, a configuration file, a pushed
configuration), so the checks live here, below everything that reads them.
"""
from __future__ import annotations

import re

from .errors import ClusterError

NODE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_node_id(node: str) -> str:
    if not isinstance(node, str) or not NODE_RE.match(node):
        raise ClusterError(f"node id {node!r} must be 1-63 of a-z, 0-9 and '-', starting with a letter or digit")
    return node


def parse_address(addr: str) -> tuple[str, int]:
    """"HOST:PORT" (HOST may be a bracketed IPv6 address) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"address {addr!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def parse_listen(address: str) -> tuple[str, int]:
    """"host:port", "[v6]:port", ":port" (all interfaces) or "port" -> (host, port); ValueError when not."""
    a = str(address).strip()
    if a.isdigit():
        host, port = "0.0.0.0", a
    elif a.startswith("["):
        host, _, port = a[1:].partition("]:")
    else:
        host, _, port = a.rpartition(":")
        host = host or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {address!r} is not host:port")
    return host, int(port)
