"""The agent's own listeners against silent peers (issue 15 asks that every
TLS listener of the project be checked like `pit serve`): the mTLS port, the
join port and the metrics listener of a real `pit agent` on 127.0.0.1, each
held by 50 TCP peers that never say a word, must still answer a real client.

Counted, not timed: the client's patience is generous; a listener that
handshook on its accept path (as cheroot did) would keep it waiting 10 s per
silent peer, 500 s in all."""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import urllib.request

from test_repl_helpers import cluster, free_port  # noqa: F401 (cluster is a fixture)
from test_view_support import wait_port

GENEROUS = 60.0
SILENT = 50


def _silent(port: int) -> list[socket.socket]:
    out = []
    for _ in range(SILENT):
        s = socket.create_connection(("127.0.0.1", port), timeout=GENEROUS)
        out.append(s)
    return out


def _tls_answers(port: int) -> bool:
    """A TLS client without a certificate gets an answer (a finished handshake, then an alert or a close;
    or the alert at once): anything but a timeout means the listener is not stalled."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=GENEROUS) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"\x00" * 16)
                s.recv(1)
        except (ssl.SSLError, ConnectionError):
            pass
        except TimeoutError:
            return False
    return True


def test_agent_listeners_are_not_stalled_by_silent_peers(cluster):  # noqa: F811
    c = cluster(replicas=0).start()
    p = c.primary
    mport = free_port()
    p.kill(signal.SIGTERM)
    p.write_config(f'cluster = "{c.cluster_file}"\nmetrics = "127.0.0.1:{mport}"')
    p.start()
    with open(os.path.join(p.state, "node.json")) as f:
        join_port = int(json.load(f)["join_address"].rsplit(":", 1)[1])
    held = []
    try:
        for port in (p.port, join_port, mport):
            wait_port(port, p.proc, timeout=GENEROUS)  # (metrics start after the control socket)
            held += _silent(port)
        assert _tls_answers(p.port), "mTLS port"
        assert _tls_answers(join_port), "join port"
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=GENEROUS) as r:
            assert r.status == 200 and b"pit_" in r.read()
        assert p.ctl("status", check=False).returncode == 0, p.logtext()
    finally:
        for s in held:
            s.close()
