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
connections; the same GET and PROPFIND against `rclone serve webdav`, the GET
against nginx (when installed; it has no PROPFIND) and against a raw Python
`ssl` socket sending the file's bytes (the TLS floor of the machine), plus
`pit cat` of the file (the read path without HTTP or TLS), in interleaved
rounds so that every column sees the same load; each server's CPU seconds
per request come from /proc. `--work DIR` keeps (and reuses) the data.

    .venv/bin/python bench/views.py --serving --size-mib 1024 --rounds 3 --work /tmp/serve-bench"""
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


def _tls_floor(cert: str, key: str, path: str, port: int) -> None:
    """The TLS floor of this machine: each HTTPS request answered with `path`'s bytes, read into
    one 1 MiB buffer and written with `SSLSocket.sendall` (no HTTP framework, no store)."""
    import socket
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    while True:
        c, _ = ls.accept()
        try:
            s = ctx.wrap_socket(c, server_side=True)
            req = b""
            while b"\r\n\r\n" not in req:
                d = s.recv(65536)
                if not d:
                    break
                req += d
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % os.path.getsize(path))
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    s.sendall(mv[:n])
            s.close()
        except OSError:
            pass


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _nginx(work: str, root: str, port: int, cert: str, key: str):
    """nginx (Debian's) serving `root` over TLS with Basic auth u:pw, one worker, or None if not installed."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        return None, ""
    d = os.path.join(work, "nginx")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "htpasswd"), "w") as f:
        f.write("u:{PLAIN}pw\n")
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    root {root}; auth_basic "bench"; auth_basic_user_file {d}/htpasswd; }} }}
""")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().rpartition("/")[2]
    return subprocess.Popen([nginx, "-c", conf, "-p", d], stderr=subprocess.DEVNULL), version


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def serving(a) -> None:
    """Issue 15's serving figures (see the module docstring). The GET is measured in rounds, each
    round one GET from every server in turn (pit serve, rclone, nginx, the raw TLS floor) and one
    `pit cat`, so that all see the same load; each server's CPU seconds per GET come from /proc."""
    from store.ingest import create_snapshot
    from store.repository import Repository
    from davserver.config import hash_password

    work = a.work or tempfile.mkdtemp(prefix="pit-bench-serve-")
    rows = []
    procs = []
    try:
        src = os.path.join(work, "data")
        if not os.path.exists(os.path.join(work, "repo")):
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
        load_before = _load()
        gets = {"pit": (srv, f"https://127.0.0.1:{port}/b/latest/data/big.bin")}
        pfs = {"pit": (srv, f"https://127.0.0.1:{port}/b/latest/data/many/")}
        names = {"pit": "`pit serve`"}
        if a.compare_with:
            # the same repository served by another davserver (an older commit's, for a before/after)
            cfg2 = os.path.join(work, "serve-compare.toml")
            with open(cfg) as f, open(cfg2, "w") as g:
                g.write(f.read().replace(f"port = {port}", f"port = {port + 4}", 1))
            old = subprocess.Popen([PIT, "-r", os.path.join(work, "repo"), "serve", "-c", cfg2], cwd="/",
                                   stderr=subprocess.DEVNULL,
                                   env=dict(os.environ, PYTHONPATH=os.path.abspath(a.compare_with)))
            procs.append(old)
            gets["old"] = (old, f"https://127.0.0.1:{port + 4}/b/latest/data/big.bin")
            pfs["old"] = (old, f"https://127.0.0.1:{port + 4}/b/latest/data/many/")
            names["old"] = f"`pit serve`, davserver/ from {a.compare_with}"
        if shutil.which("rclone"):
            rc = subprocess.Popen(["rclone", "serve", "webdav", src, "--addr", f"127.0.0.1:{port + 1}", "--cert", ca,
                                   "--key", key, "--user", "u", "--pass", "pw", "--read-only"],
                                  stderr=subprocess.DEVNULL, env=dict(os.environ, RCLONE_CONFIG="/dev/null"))
            procs.append(rc)
            rv = subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout.split()[1]
            gets["rclone"] = (rc, f"https://127.0.0.1:{port + 1}/big.bin")
            pfs["rclone"] = (rc, f"https://127.0.0.1:{port + 1}/many/")
            names["rclone"] = f"rclone {rv} `serve webdav`"
        ng, nv = _nginx(work, src, port + 2, ca, key)
        if ng is not None:
            procs.append(ng)
            gets["nginx"] = (ng, f"https://127.0.0.1:{port + 2}/big.bin")
            names["nginx"] = f"nginx {nv} (static file, TLS, no kTLS)"
        fl = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--tls-floor", ca, key,
                               os.path.join(src, "big.bin"), str(port + 3)], stderr=subprocess.DEVNULL)
        procs.append(fl)
        gets["floor"] = (fl, f"https://127.0.0.1:{port + 3}/big.bin")
        names["floor"] = "raw TLS floor (Python `ssl` sendall of 1 MiB reads)"
        time.sleep(2)
        rounds = a.rounds
        wall: dict[str, list[float]] = {k: [] for k in [*gets, "cat"]}
        cpu: dict[str, list[float]] = {k: [] for k in gets}
        for _ in range(rounds):
            for k, (p, url) in gets.items():
                c0, t = _cpu(p.pid), time.perf_counter()
                _tls_get(url, ca, "u:pw")
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(_cpu(p.pid) - c0)
            t = time.perf_counter()
            subprocess.run(f"{PIT} -r {work}/repo cat b@latest:data/big.bin > /dev/null", shell=True, check=True)
            wall["cat"].append(time.perf_counter() - t)
        pf_wall: dict[str, list[float]] = {k: [] for k in pfs}
        pf_cpu: dict[str, list[float]] = {k: [] for k in pfs}
        for _ in range(a.rounds * 2):
            for k, (p, url) in pfs.items():
                c0, t = _cpu(p.pid), time.perf_counter()
                _propfind(url, ca, "u:pw")
                pf_wall[k].append(time.perf_counter() - t)
                pf_cpu[k].append(_cpu(p.pid) - c0)
        load_after = _load()

        def med(xs):
            return sorted(xs)[len(xs) // 2]

        mb = size / 1e6
        gib = size / (1 << 30)
        for k in gets:
            rows.append((f"{names[k]}: GET of the {a.size_mib} MiB file over TLS (curl)",
                         f"best {mb / min(wall[k]):.0f} MB/s, median {mb / med(wall[k]):.0f} MB/s, "
                         f"pit at {min(wall[k]) / min(wall['pit']):.2f}x this",
                         f"server CPU {min(cpu[k]) / gib:.2f} s per GiB", ">= 500 MB/s" if k == "pit" else ""))
        rows.append(("`pit cat` of the same file (the read path, no TLS)",
                     f"best {mb / min(wall['cat']):.0f} MB/s, median {mb / med(wall['cat']):.0f} MB/s", "", ""))
        for k in pfs:
            rows.append((f"{names[k]}: PROPFIND Depth 1, 10,000 entries, TLS (curl, allprop)",
                         f"best {min(pf_wall[k]):.2f} s, median {med(pf_wall[k]):.2f} s",
                         f"server CPU {min(pf_cpu[k]):.2f} s", "< 0.3 s" if k == "pit" else ""))
        if not a.skip_load:
            lat = _concurrent("127.0.0.1", port, ca, "u:pw", "/b/latest/data/many/f00001.txt", 200)
            t_normal = _hostile_then_normal(port, ca, "u:pw", "/b/latest/data/big.bin",
                                            "/b/latest/data/many/f00002.txt")
            rows.append(("`pit serve`: 200 concurrent clients, new TLS connection + GET each",
                         f"p50 {lat[len(lat) // 2]:.2f} s, p95 {lat[int(len(lat) * 0.95)]:.2f} s, max {lat[-1]:.2f} s",
                         "", "p95 < 1 s"))
            rows.append(("`pit serve`: one GET while 16 slow downloads + 50 silent peers hold connections",
                         f"{t_normal:.2f} s", "", "< 0.5 s"))
        if ng is None:
            rows.append(("nginx", "not installed here", "", ""))
        rows.append(("load average (1, 5, 15 min) before / after", f"{load_before} / {load_after}",
                     f"{os.cpu_count()} CPUs, {rounds} rounds", ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| measurement | result | note | goal |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--work", default=None)
    ap.add_argument("--serving", action="store_true", help="only issue 15's `pit serve` figures (TLS)")
    ap.add_argument("--rounds", type=int, default=3, help="--serving: GET rounds (PROPFIND: twice as many)")
    ap.add_argument("--skip-load", action="store_true", help="--serving: without the concurrency and hostile runs")
    ap.add_argument("--compare-with", metavar="DIR",
                    help="--serving: also a pit serve whose davserver/ comes from DIR "
                         "(`git archive COMMIT davserver | tar -x -C DIR`): before/after in the same rounds")
    ap.add_argument("--tls-floor", nargs=4, metavar=("CERT", "KEY", "FILE", "PORT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tls_floor:
        cert, key, path, port = a.tls_floor
        return _tls_floor(cert, key, path, int(port))
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
