"""Screenshot of the browser view of a file's previous versions, for docs/restore.md.

    .venv/bin/python bench/screenshot.py [--out docs/img/versions-listing.png]

Builds a small repository in a temporary folder (a spreadsheet changed in 3 of
5 snapshots, one snapshot verified), serves it with `pit serve` on 127.0.0.1,
and has headless Chromium render
/office/.versions/data/sales/report.xlsx/ to a PNG. Everything temporary is
removed, the server is stopped by its PID. Needs Debian's `chromium`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
PIT = os.path.join(os.path.dirname(sys.executable), "pit")
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", "--window-size=1000,700"]


def write(root: str, rel: str, data: bytes) -> None:
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "versions-listing.png"))
    a = ap.parse_args()
    if not shutil.which("chromium"):
        sys.exit("chromium is not installed (apt-get install chromium)")
    from store.ingest import create_snapshot
    from store.repository import Repository
    from davserver.config import hash_password

    work = tempfile.mkdtemp(prefix="pit-shot-")
    srv = None
    try:
        src = os.path.join(work, "data")
        write(src, "sales/notes.txt", b"quarterly notes")
        repo = Repository.init(os.path.join(work, "repo"))
        # 5 snapshots; the report changes in 3 of them (one change back to an old size)
        contents = [b"Q3 draft" * 4000, None, b"Q3 figures, checked" * 3000, None, b"Q3 final" * 5200]
        for i, body in enumerate(contents):
            if body is not None:
                write(src, "sales/report.xlsx", body)
            write(src, "sales/notes.txt", b"quarterly notes, day %d" % i)
            create_snapshot(repo, "office", [src])
            time.sleep(1.1)  # snapshot names have one-second resolution
        repo.close()
        subprocess.run([PIT, "-r", os.path.join(work, "repo"), "verify"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cfg = os.path.join(work, "serve.toml")
        with open(cfg, "w") as f:
            f.write(f'[users.alice]\npassword = "{hash_password("s3cret")}"\nsets = ["office"]\n')
        port = free_port()
        srv = subprocess.Popen([PIT, "-r", os.path.join(work, "repo"), "serve", "-c", cfg, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if srv.poll() is not None or time.monotonic() > deadline:
                    sys.exit("pit serve did not start")
                time.sleep(0.1)
        url = f"http://alice:s3cret@127.0.0.1:{port}/office/.versions/data/sales/report.xlsx/"
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        shot = os.path.join(work, "shot.png")
        r = subprocess.run(CHROMIUM + [f"--user-data-dir={os.path.join(work, 'profile')}", f"--screenshot={shot}",
                                       url], capture_output=True, text=True, timeout=180)
        if not os.path.exists(shot):
            sys.exit(f"chromium made no screenshot:\n{r.stderr[-2000:]}")
        shutil.copy(shot, a.out)
        print(f"{a.out}: {os.path.getsize(a.out)} bytes")
    finally:
        if srv is not None:
            srv.terminate()
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
