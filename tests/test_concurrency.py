"""Readers in other processes while a writer snapshots: they never error, never
wait for the writer, and every snapshot they see restores to exactly the tree
it was taken of (LMDB MVCC + pack bytes fsynced before the commit)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from conftest import MiB, make_tree, pit_env, rand_bytes, remove, run_pit, snapshot, tree_digest

HERE = os.path.dirname(os.path.abspath(__file__))

READER = r"""
import hashlib, json, os, random, shutil, subprocess, sys
sys.path.insert(0, sys.argv[1])
from conftest import PIT, list_snaps, restore, tree_digest

repo, out, stop, seed = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
rnd = random.Random(seed)
done = 0
while True:
    stopping = os.path.exists(stop)
    snaps = list_snaps(repo)
    assert snaps, "the first snapshot vanished"
    for sid in dict.fromkeys([snaps[-1].hex, rnd.choice(snaps).hex]):
        shutil.rmtree(out, ignore_errors=True)
        restore(repo, sid, out)
        d = tree_digest(os.path.join(out, "src"))
        print("restored", sid, hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest(), flush=True)
    for args in (["snapshots", "--json"], ["ls", "-R", "--json", "w@latest"], ["cat", "w@latest:src/gen.txt"]):
        p = subprocess.run([PIT, "--repo", repo, *args], capture_output=True)
        if p.returncode != 0:
            sys.exit(f"pit {args} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
        if args[-1] != "w@latest:src/gen.txt":
            json.loads(p.stdout)
        else:
            assert p.stdout.startswith(b"generation "), p.stdout
    done += 1
    print("iteration", done, flush=True)
    if stopping and done >= 3:
        break
"""


def digest_hash(root) -> str:
    return hashlib.sha256(repr(sorted(tree_digest(root).items())).encode()).hexdigest()


def generation(src, k: int) -> None:
    """Generation k of the source tree: a shared part, a rolling edit, new data, old data removed."""
    make_tree(src, {"gen.txt": b"generation %d\n" % k, "new-%03d" % k: rand_bytes(1_500_000, "new%d" % k),
                    "shared": {f"s{i}": rand_bytes(40_000, "s%d" % i) for i in range(10)},
                    "nested": {"level": {"k": b"%d" % k}}}, mtime=None)
    old = os.path.join(src, "new-%03d" % (k - 2))
    if os.path.exists(old):
        remove(old)
    with open(os.path.join(src, "shared", "s3"), "r+b") as f:
        f.seek((k * 7919) % 30_000)
        f.write(rand_bytes(2000, "edit%d" % k))


def test_readers_while_a_writer_snapshots(repo_path, tmp_path):
    src = tmp_path / "src"
    generation(src, 0)
    first = snapshot(repo_path, "w", src)
    expected = {first.hex: digest_hash(src)}

    stop = tmp_path / "stop"
    readers = []
    for i in range(2):
        out = tmp_path / f"reader{i}.out"
        readers.append((subprocess.Popen(
            [sys.executable, "-c", READER, HERE, repo_path, str(tmp_path / f"scratch{i}"), str(stop), str(i)],
            stdout=open(out, "wb"), stderr=subprocess.PIPE, env=pit_env()), out))
    try:
        for k in range(1, 9):
            generation(src, k)
            snap = json.loads(run_pit(repo_path, "snapshot", "--set", "w", src, "--json").stdout)
            expected[snap["id"]] = digest_hash(src)
    finally:
        stop.write_text("stop")
        results = []
        for proc, out in readers:
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            results.append((proc.returncode, err.decode(errors="replace"), out.read_text()))

    seen = set()
    for code, err, out in results:
        assert code == 0, f"a reader failed ({code}):\n{err[-3000:]}"
        assert "Traceback" not in err and err == "", err[-3000:]
        lines = [ln.split() for ln in out.splitlines() if ln.startswith("restored ")]
        assert lines, "a reader restored nothing"
        for _, sid, h in lines:
            assert sid in expected, f"a reader saw snapshot {sid[:12]}, which the writer never made"
            assert h == expected[sid], f"snapshot {sid[:12]} restored differently in a reader"
            seen.add(sid)
    assert len(seen) >= 2, "readers saw fewer than two snapshots"
    print(f"readers restored {len(seen)} distinct snapshots of {len(expected)}")
    assert len(json.loads(run_pit(repo_path, "snapshots", "--json").stdout)) == 9


def test_reader_opened_before_commit_keeps_its_view(repo_path, tmp_path):
    """A read transaction sees one commit: a snapshot committed after it began
    is invisible to it, and what it sees stays readable."""
    from conftest import opened
    from store.objects import ObjectReader
    from store.snapshots import list_snapshots

    src = tmp_path / "src"
    make_tree(src, {"a": rand_bytes(MiB, "a")})
    s1 = snapshot(repo_path, "v", src)
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nsys.path.insert(0, sys.argv[1])\n"
         "from conftest import opened\nfrom store.snapshots import list_snapshots\n"
         "from store.objects import ObjectReader, iter_file_chunks\n"
         "with opened(sys.argv[2], readonly=True) as repo, repo.reading() as txn:\n"
         "    before = [s.hex for s in list_snapshots(repo, txn)]\n"
         "    print('ready', flush=True); sys.stdin.readline()\n"
         "    after = [s.hex for s in list_snapshots(repo, txn)]\n"
         "    r = ObjectReader(repo, txn)\n"
         "    data = b''.join(iter_file_chunks(r, r.lookup(list_snapshots(repo, txn)[-1].root, 'src/a')))\n"
         "    print(before == after, len(after), len(data), flush=True)\n",
         HERE, repo_path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pit_env())
    try:
        assert reader.stdout.readline() == b"ready\n"
        make_tree(src, {"a": rand_bytes(MiB, "a2")})
        s2 = json.loads(run_pit(repo_path, "snapshot", "--set", "v", src, "--json").stdout)
        reader.stdin.write(b"go\n")
        reader.stdin.flush()
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0, err.decode()
    assert out.split() == [b"True", b"1", str(MiB).encode()]
    with opened(repo_path, readonly=True) as repo, repo.reading() as txn:
        assert [s.hex for s in list_snapshots(repo, txn)] == [s1.hex, s2["id"]]
        r = ObjectReader(repo, txn)
        assert r.lookup(s1.root, "src/a").size == MiB
