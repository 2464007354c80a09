"""Big files get leaf filelists under an index: a small change shares all but
a few leaves, and dropping an old version costs only what changed."""
import os
import random

from store.files import INDEX_VERSION, decode_filelist_level
from store.ingest import create_snapshot
from store.objects import ObjectReader
from store.prune import DropStats, drop_snapshot
from store.repair import rebuild_index
from store.repository import Repository
from store.snapshots import list_snapshots
from store.verify import verify


def _pages(rng, n):
    return b"".join(rng.randbytes(4096) + bytes(4096) for _ in range(n))


def _file_lists(repo, snap):
    with repo.reading() as txn:
        r = ObjectReader(repo, txn)
        e = r.lookup(snap.root, "src/db")
        level, leaves, _ = decode_filelist_level(r.blob(e.content))
        return e, level, leaves, r.chunk_list(e).ids


def test_two_levels_share_leaves_and_drop_cheaply(tmp_path):
    rng = random.Random(11)
    src = tmp_path / "src"
    src.mkdir()
    db = src / "db"
    db.write_bytes(_pages(rng, 2048))  # 16 MiB: ~1000 chunks
    repo = Repository.init(str(tmp_path / "repo"))
    s1 = create_snapshot(repo, "s", [str(src)])
    with open(db, "r+b") as f:  # a database writes one page in place
        f.seek(8192 * 1000)
        f.write(rng.randbytes(4096))
    os.utime(db, ns=(1, 1))
    s2 = create_snapshot(repo, "s", [str(src)])

    e1, level1, leaves1, chunks1 = _file_lists(repo, s1)
    e2, level2, leaves2, chunks2 = _file_lists(repo, s2)
    assert level1 == level2 == INDEX_VERSION
    assert len(chunks1) == e1.nchunks > 256
    assert len(set(leaves1) & set(leaves2)) >= len(leaves2) - 2  # only the changed leaf (or two) is new
    assert len(set(chunks2) - set(chunks1)) <= 3

    with repo.writer() as w:
        st = drop_snapshot(w, s1, DropStats())
    # the index, the old leaf (or two), its unique chunks and the trees: not ~1000 chunk entries
    assert st.blobs_freed < 12
    assert verify(repo, depth="deep").clean
    with repo.reading() as txn:
        r = ObjectReader(repo, txn)
        got = b"".join(r.open_file(r.lookup(s2.root, "src/db")).iter_chunks())
    assert got == db.read_bytes()
    repo.close()

    rebuild_index(str(tmp_path / "repo"))
    repo = Repository(str(tmp_path / "repo"))
    with repo.reading() as txn:
        assert [s.id for s in list_snapshots(repo, txn)] == [s2.id]
    assert verify(repo, depth="deep").clean
    with repo.reading() as txn:
        r = ObjectReader(repo, txn)
        assert b"".join(r.open_file(r.lookup(s2.root, "src/db")).iter_chunks()) == db.read_bytes()
    repo.close()
