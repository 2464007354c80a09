"""Many threads reading uncached chunks at once (FUSE and WebDAV serve
requests on threads): every read must return the right bytes."""
import os
import random
from concurrent.futures import ThreadPoolExecutor

from store.ingest import create_snapshot
from store.objects import ObjectReader
from store.repository import Repository


def test_parallel_uncached_reads_are_correct(tmp_path):
    rng = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    # compressible, so every read goes through zstd
    data = b"".join(rng.choice([b"alpha ", b"beta ", b"gamma "]) * rng.randint(1, 50) for _ in range(60000))
    (src / "big.txt").write_bytes(data)
    repo = Repository.init(str(tmp_path / "repo"))
    snap = create_snapshot(repo, "s", [str(src)])
    repo.close()
    r = Repository(str(tmp_path / "repo"), readonly=True)
    r.chunk_cache.budget = 0  # nothing cached: every read decompresses
    with r.reading() as txn:
        reader = ObjectReader(r, txn)
        f = reader.open_file(reader.lookup(snap.root, "src/big.txt"))
        offsets = [rng.randrange(0, len(data) - 70000) for _ in range(400)]

        def read(off):
            return f.read(off, 65536) == data[off:off + 65536]

        with ThreadPoolExecutor(8) as ex:
            assert all(ex.map(read, offsets))
    r.close()
