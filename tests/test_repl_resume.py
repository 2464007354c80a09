"""A batch whose changes span several CHANGES frames, and (below) a replica killed in the middle of a batch.

The master sends a batch's chunks in one OFFER/NEED/CHUNKS round and then its changes in as many CHANGES
frames as their size needs (replicator/stream/changes.py, `CHANGES_BYTES`). The replica used to empty its
spool after every CHANGES frame, so the second frame's chunks were gone ("neither sent nor present"), the
connection dropped, and the catch-up sent them again.
"""
from __future__ import annotations

import json
import os
import random

import pytest

from test_repl_helpers import Cluster, wait_for

MIB = 1024 * 1024


def sender(c) -> dict:
    return json.loads(c.primary.ctl("status", "--local").stdout)["sets"]["web"]["replicas"]["r1"]


@pytest.fixture
def small_frames(tmp_path, monkeypatch):
    """Agents whose frames are at most 128 KiB (`PIT_MAX_FRAME`): a CHANGES frame then holds ~64 KiB of changes."""
    monkeypatch.setenv("PIT_MAX_FRAME", str(128 * 1024))
    made = []

    def make(**kw):
        c = Cluster(str(tmp_path), **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def test_a_batch_in_two_changes_frames_is_applied_without_a_resend(small_frames):
    c = small_frames(replicas=1)
    rng = random.Random(8117)
    total = 0
    # 400 files of 24 KiB with 100-byte names: ~270 bytes of change each, ~105 KB for the batch (one batch:
    # 512 paths), so its changes need two CHANGES frames of 64 KiB after one round of chunks.
    for i in range(400):
        data = rng.randbytes(24 * 1024)
        with open(os.path.join(c.src, f"{i:05d}-" + "n" * 94 + ".bin"), "wb") as f:
            f.write(data)
        total += len(data)
    c.start()
    r = c.replicas[0]
    wait_for(lambda: c.converged(r), 120, "seeding")
    assert "neither sent nor present" not in open(r.log, errors="replace").read(), r.logtext()
    st = sender(c)
    assert st["acked_batches"] >= 2, st  # the batch did span two frames
    # Each file's chunks travelled once: the second frame's were not sent again after a dropped connection
    # (that would be ~150 files, 3.6 MB more). Metadata: names, ids, change records, listings (< 0.5 MB).
    assert st["bytes_sent"] < total + MIB, (st, total)
