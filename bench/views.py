"""Restore-view benchmark: GET throughput over WebDAV vs `pit cat`, PROPFIND
Depth 1 of a 10,000-entry folder, listing one file's versions across 64
snapshots, and `ls -R` + `cat` through `pit mount`.

    .venv/bin/python bench/views.py [--size-mib 1024] [--work DIR]
    .venv/bin/python bench/views.py --serving [--size-mib 1024]   # issue 15: `pit serve` over TLS only

Prints a Markdown table (paste into docs/benchmarks.md, "Restore views").
`--serving` measures what issue 15 set goals for, over TLS with the
self-signed certificate: a GET of the big file, PROPFIND Depth 1 of the
10,000-entry folder, 200 concurrent clients (each a new TLS connection and one
GET), and one normal request while 16 slow downloads and 50 silent peers hold
connections; the same GET and PROPFIND against `rclone serve webdav` and nginx
(when installed) on the same file and folder."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
PIT = os.path.join(BIN, "pit")


def timed(fn, repeat=3):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        d = time.perf_counter() - t
        best = d if best is None or d < best else best
    return best


def _tls_get(url: str, cafile: str, auth: str, out: str = "/dev/null") -> None:
    subprocess.run(["curl", "-s", "-f", "--cacert", cafile, "-u", auth, "-o", out, url], check=True)


def _propfind(url: str, cafile: str, auth: str) -> None:
    subprocess.run(["curl", "-s", "-f", "--cacert", cafile, "-u", auth, "-o", "/dev/null", "-X", "PROPFIND",
                    "-H", "Depth: 1", url], check=True)


def _concurrent(host: str, port: int, cafile: str, auth: str, path: str, n: int) -> list[float]:
    """n clients at once, each a new TLS connection and one GET: their latencies (s)."""
    import base64
    import http.client
    import ssl
    import threading

    ctx = ssl.create_default_context(cafile=cafile)
    hdr = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    go = threading.Event()
    lat: list[float] = []
    bad: list[str] = []

    def one():
        go.wait()
        t = time.perf_counter()
        try:
            c = http.client.HTTPSConnection(host, port, context=ctx, timeout=120)
            c.request("GET", path, headers=hdr)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status != 200:
                bad.append(str(r.status))
        except OSError as exc:
            bad.append(repr(exc))
        lat.append(time.perf_counter() - t)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    go.set()
    for th in threads:
        th.join()
    if bad:
        raise SystemExit(f"{len(bad)} of {n} concurrent requests failed: {bad[:3]}")
    return sorted(lat)


def _hostile_then_normal(port: int, cafile: str, auth: str, big: str, small: str) -> float:
    """One normal GET while 16 slow downloads and 50 silent peers hold connections: its latency (s)."""
    import base64
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=cafile)
    hdr = "Basic " + base64.b64encode(auth.encode()).decode()
    held = []
    try:
        for _ in range(16):
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(("127.0.0.1", port))
            s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            s.sendall(f"GET {big} HTTP/1.1\r\nHost: x\r\nAuthorization: {hdr}\r\n\r\n".encode())
            s.recv(4096)
            held.append(s)
        for _ in range(50):
            held.append(socket.create_connection(("127.0.0.1", port)))
        t = time.perf_counter()
        _tls_get(f"https://127.0.0.1:{port}{small}", cafile, auth)
        return time.perf_counter() - t
    finally:
        for s in held:
            s.close()


def serving(a) -> None:
    """Issue 15's serving figures (see the module docstring)."""
    from store.ingest import create_snapshot
    from store.repository import Repository
    from davserver.config import hash_password

    work = a.work or tempfile.mkdtemp(prefix="pit-bench-serve-")
    rows = []
    procs = []
    try:
        src = os.path.join(work, "data")
        os.makedirs(os.path.join(src, "many"))
        with open(os.path.join(src, "big.bin"), "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        for i in range(10_000):
            with open(os.path.join(src, "many", f"f{i:05}.txt"), "w") as f:
                f.write(str(i))
        repo = Repository.init(os.path.join(work, "repo"))
        create_snapshot(repo, "b", [src])
        repo.close()
        size = os.path.getsize(os.path.join(src, "big.bin"))
        cfg = os.path.join(work, "serve.toml")
        port = 18000 + os.getpid() % 1000
        with open(cfg, "w") as f:
            f.write(f'[server]\nport = {port}\nself_signed = true\nmax_connections_per_client = 400\n'
                    f'[users.u]\npassword = "{hash_password("pw")}"\nsets = ["*"]\n')
        srv = subprocess.Popen([PIT, "-r", os.path.join(work, "repo"), "serve", "-c", cfg], stderr=subprocess.DEVNULL)
        procs.append(srv)
        time.sleep(2)
        ca = os.path.join(work, "repo", "serve-tls", "cert.pem")
        key = os.path.join(work, "repo", "serve-tls", "key.pem")
        url = f"https://127.0.0.1:{port}"
        t_get = timed(lambda: _tls_get(f"{url}/b/latest/data/big.bin", ca, "u:pw"), 2)
        t_pf = timed(lambda: _propfind(f"{url}/b/latest/data/many/", ca, "u:pw"), 3)
        lat = _concurrent("127.0.0.1", port, ca, "u:pw", "/b/latest/data/many/f00001.txt", 200)
        t_normal = _hostile_then_normal(port, ca, "u:pw", "/b/latest/data/big.bin", "/b/latest/data/many/f00002.txt")
        rows.append(("`pit serve`: GET of the 1 GiB file over TLS (curl)", f"{size / t_get / 1e6:.0f} MB/s", ">= 500 MB/s"))
        rows.append(("`pit serve`: PROPFIND Depth 1, 10,000 entries, TLS (curl)", f"{t_pf:.2f} s", "< 0.3 s"))
        rows.append(("`pit serve`: 200 concurrent clients, new TLS connection + GET each",
                     f"p50 {lat[len(lat) // 2]:.2f} s, p95 {lat[int(len(lat) * 0.95)]:.2f} s, max {lat[-1]:.2f} s",
                     "p95 < 1 s"))
        rows.append(("`pit serve`: one GET while 16 slow downloads + 50 silent peers hold connections",
                     f"{t_normal:.2f} s", "< 0.5 s"))
        srv.terminate()
        srv.wait()
        if shutil.which("rclone"):
            rport = port + 1
            rc = subprocess.Popen(["rclone", "serve", "webdav", src, "--addr", f"127.0.0.1:{rport}", "--cert", ca,
                                   "--key", key, "--user", "u", "--pass", "pw", "--read-only"],
                                  stderr=subprocess.DEVNULL, env=dict(os.environ, RCLONE_CONFIG="/dev/null"))
            procs.append(rc)
            time.sleep(2)
            rurl = f"https://127.0.0.1:{rport}"
            r_get = timed(lambda: _tls_get(f"{rurl}/big.bin", ca, "u:pw"), 2)
            r_pf = timed(lambda: _propfind(f"{rurl}/many/", ca, "u:pw"), 3)
            rv = subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout.split()[1]
            rows.append((f"rclone {rv} serve webdav: GET of the 1 GiB file over TLS", f"{size / r_get / 1e6:.0f} MB/s", ""))
            rows.append((f"rclone {rv} serve webdav: PROPFIND Depth 1, 10,000 entries, TLS", f"{r_pf:.2f} s", ""))
        if not shutil.which("nginx"):
            rows.append(("nginx", "not installed here", ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| measurement | result | goal |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--work", default=None)
    ap.add_argument("--serving", action="store_true", help="only issue 15's `pit serve` figures (TLS)")
    a = ap.parse_args()
    if a.serving:
        return serving(a)
    from store.ingest import create_snapshot
    from store.repository import Repository
    from store import versions as V
    from davserver.config import hash_password

    work = a.work or tempfile.mkdtemp(prefix="pit-bench-views-")
    rows = []
    try:
        src = os.path.join(work, "data")
        os.makedirs(os.path.join(src, "many"))
        with open(os.path.join(src, "big.bin"), "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        for i in range(10_000):
            with open(os.path.join(src, "many", f"f{i:05}.txt"), "w") as f:
                f.write(str(i))
        repo = Repository.init(os.path.join(work, "repo"))
        create_snapshot(repo, "b", [src])
        for i in range(63):
            with open(os.path.join(src, "doc.txt"), "w") as f:
                f.write(f"version {i}")
            create_snapshot(repo, "b", [src], changes=[os.path.join(src, "doc.txt")])
        with repo.reading() as txn:
            n = len(V.list_versions(repo, txn, "b", b"data/doc.txt"))

            def lv():
                with repo.reading() as t2:
                    V.list_versions(repo, t2, "b", b"data/doc.txt")
            t_lv = timed(lv, 20)
        rows.append(("list versions of one file across 64 snapshots (in process)", f"{t_lv * 1000:.2f} ms",
                     f"{n} versions", "< 50 ms"))
        repo.close()

        out = os.path.join(work, "out.bin")
        size = os.path.getsize(os.path.join(src, "big.bin"))
        t_cat = timed(lambda: subprocess.run(f"{PIT} -r {work}/repo cat b@latest:data/big.bin > {out}",
                                             shell=True, check=True), 2)
        cfg = os.path.join(work, "serve.toml")
        with open(cfg, "w") as f:
            f.write(f'[users.u]\npassword = "{hash_password("pw")}"\nsets = ["*"]\n')
        port = 18000 + os.getpid() % 1000
        srv = subprocess.Popen([PIT, "-r", os.path.join(work, "repo"), "serve", "-c", cfg, "--port", str(port)],
                               stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)
            url = f"http://127.0.0.1:{port}"
            cu = ["curl", "-s", "-u", "u:pw"]
            t_get = timed(lambda: subprocess.run(cu + ["-o", out, f"{url}/b/latest/data/big.bin"], check=True), 2)
            t_pf = timed(lambda: subprocess.run(cu + ["-o", "/dev/null", "-X", "PROPFIND", "-H", "Depth: 1",
                                                     f"{url}/b/latest/data/many/"], check=True), 3)
            t_vh = timed(lambda: subprocess.run(cu + ["-o", "/dev/null", "-X", "PROPFIND", "-H", "Depth: 1",
                                                     f"{url}/b/.versions/data/doc.txt/"], check=True), 5)
        finally:
            srv.terminate()
            srv.wait()
        rows.insert(0, (f"GET {a.size_mib} MiB file over WebDAV (HTTP, curl)", f"{size / t_get / 1e6:.0f} MB/s",
                        f"`pit cat` {size / t_cat / 1e6:.0f} MB/s ({t_get / t_cat:.2f}x its time)",
                        ">= 300 MB/s and >= half of pit cat"))
        rows.insert(1, ("PROPFIND Depth 1, 10,000-entry folder", f"{t_pf:.2f} s", "allprop", "< 0.5 s"))
        rows.append(("PROPFIND Depth 1 of a file's .versions folder (64 snapshots)", f"{t_vh * 1000:.0f} ms",
                     "over HTTP incl. curl start", ""))

        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt)
        m = subprocess.Popen([PIT, "mount", os.path.join(work, "repo"), mnt], stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                if os.path.exists(os.path.join(mnt, "b")):
                    break
                time.sleep(0.05)
            snapname = sorted(n for n in os.listdir(os.path.join(mnt, "b")) if n[0].isdigit())[0]
            t_ls = timed(lambda: subprocess.run(["ls", "-R", os.path.join(mnt, "b", snapname)],
                                                stdout=subprocess.DEVNULL, check=True), 1)
            t_mc = timed(lambda: subprocess.run(["cat", os.path.join(mnt, "b", snapname, "data", "big.bin")],
                                                stdout=subprocess.DEVNULL, check=True), 1)
        finally:
            subprocess.run(["fusermount3", "-u", mnt])
            m.wait()
        rows.append(("`pit mount`: ls -R of one snapshot (10,003 entries), cold", f"{t_ls:.2f} s", "", ""))
        rows.append((f"`pit mount`: cat {a.size_mib} MiB file", f"{size / t_mc / 1e6:.0f} MB/s", "", ""))
        if shutil.which("restic"):
            rows.append(("restic mount", "not measured yet", "", ""))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| measurement | result | note | goal |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
