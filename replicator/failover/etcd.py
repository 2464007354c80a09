"""A small client for etcd's v3 JSON gateway (the coordination engine behind failover).

Why not a library: `etcd3` is unmaintained and breaks with current protobuf,
`aetcd` has no TLS, `etcd3gw` talks to one endpoint. The gateway is plain
HTTP+JSON, so the standard library covers leases, transactions and ranges,
with TLS through `ssl` and rotation over several endpoints (a black-holed
member must not stall us: every request has a short timeout and the next
endpoint is tried).

Keys and values travel base64-encoded; int64 fields come back as strings.
"""
from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.parse
from dataclasses import dataclass

from ..errors import EtcdError

def _b64(v: bytes | str) -> str:
    return base64.b64encode(v.encode() if isinstance(v, str) else v).decode()


def _unb64(v: str | None) -> bytes:
    return base64.b64decode(v) if v else b""


@dataclass
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kv(d: dict) -> KeyValue:
    return KeyValue(_unb64(d.get("key")), _unb64(d.get("value")), int(d.get("create_revision", 0)),
                    int(d.get("mod_revision", 0)), int(d.get("lease", 0)))


class Etcd:
    def __init__(self, endpoints: list[str], timeout: float = 1.0, ssl_context: ssl.SSLContext | None = None) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoints configured")
        self.endpoints = [urllib.parse.urlsplit(e if "//" in e else f"http://{e}") for e in endpoints]
        self.timeout = timeout
        self.ssl_context = ssl_context
        self._first = 0  # the endpoint that answered last is tried first next time

    # ------------------------------------------------------------------ transport
    def call(self, path: str, body: dict) -> dict:
        errors = []
        n = len(self.endpoints)
        for k in range(n):
            i = (self._first + k) % n
            u = self.endpoints[i]
            try:
                if u.scheme == "https":
                    conn = http.client.HTTPSConnection(u.hostname, u.port or 2379, timeout=self.timeout,
                                                       context=self.ssl_context)
                else:
                    conn = http.client.HTTPConnection(u.hostname, u.port or 2379, timeout=self.timeout)
                try:
                    conn.request("POST", "/v3/" + path, json.dumps(body), {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{u.netloc}: {exc or type(exc).__name__}")
                continue
            try:
                out = json.loads(data or b"{}")
            except ValueError:
                errors.append(f"{u.netloc}: not JSON (HTTP {resp.status})")
                continue
            if resp.status != 200 or "error" in out or ("code" in out and "message" in out):
                msg = out.get("message") or out.get("error") or f"HTTP {resp.status}"
                if "leader" in str(msg) or "deadline" in str(msg) or resp.status >= 500:
                    errors.append(f"{u.netloc}: {msg}")  # this member cannot serve: try another
                    continue
                raise EtcdError(f"etcd {path}: {msg}")
            self._first = i
            return out
        raise EtcdError("etcd unreachable: " + "; ".join(errors))

    # ------------------------------------------------------------------ leases
    def grant(self, ttl: int) -> int:
        out = self.call("lease/grant", {"TTL": int(ttl)})
        return int(out["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew; the remaining TTL, or 0 when the lease no longer exists (expired or revoked)."""
        out = self.call("lease/keepalive", {"ID": str(lease)}).get("result", {})
        return max(0, int(out.get("TTL", 0)))

    def time_to_live(self, lease: int) -> tuple[int, int]:
        """(seconds left, seconds granted) of a lease; (-1, 0) when it no longer exists."""
        out = self.call("kv/lease/timetolive", {"ID": str(lease)})
        return int(out.get("TTL", -1)), int(out.get("grantedTTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    # ------------------------------------------------------------------ keys
    def get(self, key: str) -> tuple[KeyValue | None, int]:
        """The key (linearizable read) and the store's current revision."""
        out = self.call("kv/range", {"key": _b64(key)})
        kvs = out.get("kvs") or []
        return (_kv(kvs[0]) if kvs else None), int(out["header"]["revision"])

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        out = self.call("kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return [_kv(d) for d in out.get("kvs") or []]

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("kv/deleterange", {"key": _b64(key)})

    def create(self, key: str, value: bytes | str, lease: int) -> tuple[bool, int, KeyValue | None]:
        """Put `key` only if it does not exist. (won, revision, holder): on success the revision of
        the write is the fencing token; on failure the current holder is returned."""
        out = self.call("kv/txn", {
            "compare": [{"target": "CREATE", "result": "EQUAL", "key": _b64(key), "create_revision": "0"}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        rev = int(out["header"]["revision"])
        if out.get("succeeded"):
            return True, rev, None
        kvs = (out.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
        return False, rev, (_kv(kvs[0]) if kvs else None)

    def put_if(self, key: str, value: bytes | str, fence_key: str, token: int) -> bool:
        """Write `key` only while `fence_key` still carries `token` as its mod revision: the
        privileged write of a leader, rejected once a newer leader exists."""
        out = self.call("kv/txn", {
            "compare": [{"target": "MOD", "result": "EQUAL", "key": _b64(fence_key), "mod_revision": str(token)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        })
        return bool(out.get("succeeded"))

    def transfer(self, key: str, token: int, value: bytes | str, lease: int) -> tuple[bool, int]:
        """Move `key` to a new value and lease only while its mod revision is still `token` (a leader
        handing over to the node that owns `lease`): (done, revision); the revision is the new token."""
        out = self.call("kv/txn", {
            "compare": [{"target": "MOD", "result": "EQUAL", "key": _b64(key), "mod_revision": str(token)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}],
        })
        return bool(out.get("succeeded")), int(out["header"]["revision"])

    def delete_if(self, key: str, token: int) -> bool:
        """Delete `key` only if its mod revision is still `token` (a leader resigning its own key)."""
        out = self.call("kv/txn", {
            "compare": [{"target": "MOD", "result": "EQUAL", "key": _b64(key), "mod_revision": str(token)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        })
        return bool(out.get("succeeded"))
