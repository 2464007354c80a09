"""Files written to while a snapshot reads them (issue 12).

A 20 MiB file always holding one repeated byte value, rewritten in place
during `pit snapshot`, was once restored holding four different values with
exit 0. Now a file whose size, mtime or ctime moved during the read is read
again (up to MAX_REREADS times); one that still moves is stored as last read
and *named*: a warning, `changed_while_read` in the snapshot's stats and
`--json`, a mark in `pit snapshots`, and exit code 4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import init_repo, opened, pit_env, run_pit
from replicator.waiting import poll_until
from store import ingest
from store.ingest import MAX_REREADS, create_snapshot
from store.objects import ObjectReader

MiB = 1024 * 1024
WRITER = r"""
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
v = 0
with open(path, "r+b", buffering=0) as f:
    open(path + ".ready", "w").close()
    while True:  # the whole file, one byte value per pass, in place
        v = (v + 1) % 255 + 1
        block = bytes([v]) * MiB
        f.seek(0)
        for _ in range(size // MiB):
            f.write(block)
""".replace("MiB", str(MiB))


def _values(repo, snap_id: str, rel: str) -> set[int]:
    with opened(repo, readonly=True) as r, r.reading() as txn:
        from store.snapshots import resolve

        snap = resolve(r, txn, snap_id)
        rd = ObjectReader(r, txn)
        fr = rd.open_file(rd.lookup(snap.root, rel))
        return {b for chunk in fr.iter_chunks() for b in set(chunk)}


def test_a_file_rewritten_during_the_snapshot_is_named_never_silently_torn(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    live = src / "live.bin"
    live.write_bytes(b"\x01" * (20 * MiB))
    (src / "still.txt").write_bytes(b"quiet\n")
    repo = init_repo(tmp_path / "repo")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(live), str(20 * MiB)])
    try:
        poll_until(lambda: os.path.exists(str(live) + ".ready"), timeout=30, what="the writer")
        os.unlink(str(live) + ".ready")
        p = run_pit(repo, "snapshot", "--set", "s", "--json", str(src), expect=None)
    finally:
        writer.kill()
        writer.wait()
    snap = json.loads(p.stdout)
    values = _values(repo, snap["id"], "src/live.bin")
    if len(values) > 1:  # torn: it must say so, and say it about this file only
        assert p.returncode == 4, p.stderr
        assert snap["stats"]["changed_while_read"] == [str(live)]
        assert "changed while being read" in p.stderr.decode()
        listing = run_pit(repo, "snapshots").stdout.decode()
        assert "1 changed while read" in listing
    else:  # a re-read caught one whole pass: consistent, and nothing to say
        assert p.returncode == 0 and "changed_while_read" not in snap["stats"]
    assert run_pit(repo, "verify", "--deep").returncode == 0


def test_a_file_changed_once_during_its_read_is_read_again_and_stored_whole(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "db"
    f.write_bytes(b"A" * (3 * MiB))
    monkeypatch.setattr(ingest, "SEGMENT_BYTES", 256 * 1024)
    real = ingest.read_segment
    calls = []

    def write_during_first_read(seg, *a, **k):
        res = real(seg, *a, **k)
        if not calls:
            with open(f, "r+b") as w:
                w.write(b"B" * (3 * MiB))  # the whole file, once, after its first segment was read
        calls.append(seg.start)
        return res

    monkeypatch.setattr(ingest, "read_segment", write_during_first_read)
    repo = init_repo(tmp_path / "repo")
    with opened(repo) as r:
        snap = create_snapshot(r, "s", [str(src)])
    assert "changed_while_read" not in snap.stats
    assert _values(repo, snap.hex, "src/db") == {ord("B")}
    assert calls.count(0) == 2  # read, noticed, read again from the start


def test_files_that_never_settle_are_stored_as_read_after_the_rereads(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "log"
    f.write_bytes(b"x" * 100_000)
    real = ingest.read_segment
    reads = []

    def append_every_read(seg, *a, **k):
        with open(f, "ab") as w:  # a log that grows between our stat and every read
            w.write(b"y")
        reads.append(seg.start)
        return real(seg, *a, **k)

    monkeypatch.setattr(ingest, "read_segment", append_every_read)
    repo = init_repo(tmp_path / "repo")
    with opened(repo) as r:
        snap = create_snapshot(r, "s", [str(src)])
    assert len(reads) == MAX_REREADS + 1
    assert snap.stats["changed_while_read"] == [str(f)] and snap.stats["changed_while_read_count"] == 1
    assert any("changed while being read" in w for w in snap.stats["warnings"])
    with opened(repo) as r:  # never vouched for by the files cache: the next snapshot reads it again
        monkeypatch.setattr(ingest, "read_segment", real)
        again = create_snapshot(r, "s", [str(src)])
    assert again.stats["files_read"] == 1 and "changed_while_read" not in again.stats
    assert run_pit(repo, "verify", "--deep").returncode == 0
