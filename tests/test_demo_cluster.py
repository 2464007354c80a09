"""`pit demo` up, failover, status, store and down, as `make demo` runs it: real agents, etcd, namespaces
(as root) or loopback ports, the WebDAV view; afterwards nothing is left behind, also after `pit demo store`
(issue 12: the store tour replaced the demo directory, and `down` then found nothing to stop but said it had).
tests/test_demo_down.py checks `down` without a cluster."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from etcdlab import ETCD
from test_repl_helpers import PIT


def namespaces() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("pitdemo-")]


@pytest.mark.slow  # about 30 s; `make demo` (the README's first command) runs `pit demo` itself
@pytest.mark.skipif(not ETCD, reason="etcd is not installed (make deps installs etcd-server)")
def test_demo_up_twice_failover_store_down(tmp_path):
    if namespaces():
        pytest.skip("a `pit demo` is running on this machine (pit demo down removes it)")
    base = str(tmp_path / "demo")
    run = lambda *a: subprocess.run([PIT, "demo", "--dir", base, *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=400)
    try:
        for _ in range(2):  # twice in a row: the second run replaces the first
            up = run()
            assert up.returncode == 0, up.stdout[-3000:] + up.stderr
            assert "The shop is protected." in up.stdout
            assert "WebDAV view" in up.stdout and "user demo, password" in up.stdout
            assert "M site/prices.html" in up.stdout  # the day's change arrived as a new version
            assert "prices 2026" in up.stdout or "prices " in up.stdout
        url = [w for w in up.stdout.split() if w.startswith("https://127.0.0.1:")][0]
        got = subprocess.run(["curl", "-sk", "-u", "demo:pitstore-demo", url + "site/"], capture_output=True,
                             text=True, timeout=30)
        assert "/site - pitstore" in got.stdout and "Z/" in got.stdout  # the set's snapshot folders
        fo = run("failover")
        if fo.returncode != 0:  # keep the agents' logs (with every thread's stack) for the report
            for pid in subprocess.run(["pgrep", "-f", f"{base}/.*agent.toml"], capture_output=True,
                                      text=True).stdout.split():
                os.kill(int(pid), signal.SIGUSR1)
            time.sleep(1)
            shutil.copytree(os.path.join(base, "logs"), str(tmp_path / "kept-logs"))
        assert fo.returncode == 0, fo.stdout[-3000:] + fo.stderr
        assert "secondary is the primary master now" in fo.stdout
        assert "set site: image" in fo.stdout and "set db: image" in fo.stdout
        assert "answers on the secondary" in fo.stdout
        # the sales recorded after the last point came with the database's shipped log, not with a point
        sales = re.search(r"sales on the secondary: (\d+) of the (\d+) recorded", fo.stdout)
        assert sales and sales.group(1) == sales.group(2), fo.stdout
        assert "database log: sales.db: " in fo.stdout and "frames of" in fo.stdout, fo.stdout
        st = run("status")
        assert st.returncode == 0, st.stdout + st.stderr
        assert "None" not in st.stdout and "secondary  active" in st.stdout
        # the single-repository tour beside the running cluster: in its own directory, the cluster's state kept
        with open(os.path.join(base, "demo.json")) as f:
            meta = json.load(f)
        store = run("store")
        assert store.returncode == 0, store.stdout[-3000:] + store.stderr
        assert f"pitstore demo in {base}/store" in store.stdout
        assert f"serve -c {base}/store/serve.toml" in store.stdout and "--self-signed" not in store.stdout
        with open(os.path.join(base, "demo.json")) as f:
            assert json.load(f) == meta
        assert "secondary  active" in run("status").stdout
    finally:
        down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "demo removed" in down.stdout
    if meta["netns"]:
        assert "deleted namespaces (checked gone): " in down.stdout
    for name in ("etcd", "agent-secondary", "agent-archive", "serve"):
        assert f"{name} {meta['pids'][name]}" in down.stdout, down.stdout
    assert not os.path.exists(base)
    assert namespaces() == []
    for pid in meta["pids"].values():   # gone, or a zombie its new parent has not reaped yet
        try:
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().rsplit(")", 1)[1].split()[0] == "Z", pid
        except FileNotFoundError:
            pass
    left = subprocess.run(["pgrep", "-f", base], capture_output=True, text=True).stdout.split()
    assert left == [], left
