"""Encryption at rest (docs/format.md, section 12): an encrypted repository's
packs hold neither plain ids nor plain bytes, every reader opens frames through
the sealed codec, a wrong key is refused with its own error and changes
nothing, key slots can be added and removed, repair rebuilds the index by
opening frames, and tampering is an integrity error, never wrong output."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import blob_ids, pit_env, rand_bytes, run_pit
from test_repl_helpers import cluster  # noqa: F401  (the fixture)
from maint_helpers import pack_path
from store import packs as P
from store.crypto import SEAL_OVERHEAD, SealedCodec
from store.errors import DamageFound, IntegrityError, KeyRequired, KeySlotRefused, WrongKey
from store.keys import KeySource, list_slots
from store.objects import ObjectReader
from store.repair import rebuild_index
from store.repository import Repository
from store.restore import Restorer
from store.snapshots import list_snapshots

MARKER = b"PITSTORE-PLAINTEXT-MARKER-7f3a"
PASS = "correct horse battery staple"


def make_src(root) -> dict[str, bytes]:
    """An incompressible file (stored raw, uncompressed) and a very compressible one with a marker."""
    files = {"rand.bin": rand_bytes(400_000, "enc-rand"),
             "marker.txt": MARKER * 5000,
             "small.txt": MARKER + b" alone\n"}
    os.makedirs(root, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return files


def pack_bytes(repo: str) -> list[bytes]:
    out = []
    for dp, _, fns in os.walk(os.path.join(repo, "packs")):
        for n in fns:
            with open(os.path.join(dp, n), "rb") as f:
                out.append(f.read())
    assert out
    return out


def assert_nothing_plain(repo: str, files: dict[str, bytes], keys: KeySource, extra: list[bytes] = ()) -> None:
    """No logical id (blobs and snapshots, and `extra` ones), no marker, no run of the random file in any pack."""
    with Repository(repo, readonly=True, keys=keys) as r, r.reading() as txn:
        ids = []
        with txn.cursor(db=r.index.db["blobs"]) as cur:
            ids += [bytes(k) for k, _ in cur]
        ids += [s.id for s in list_snapshots(r, txn)]
    assert len(ids) > 5
    ids += list(extra)
    # the chunks' ids are what anyone can compute from a file they hold
    ids.append(blake3.blake3(files["small.txt"]).digest())
    rnd = files["rand.bin"]
    probes = [rnd[i:i + 48] for i in range(0, len(rnd) - 48, 9973)]
    for data in pack_bytes(repo):
        assert MARKER not in data
        assert not [i for i in ids if i in data]
        assert not [p for p in probes if p in data]


def tree_bytes(root) -> dict[str, bytes]:
    out = {}
    for dp, _, fns in os.walk(root):
        for n in fns:
            with open(os.path.join(dp, n), "rb") as f:
                out[os.path.relpath(os.path.join(dp, n), root)] = f.read()
    return out


def state_of(path) -> dict:
    """Every file under path: size, mtime and content hash (a repository untouched keeps it)."""
    out = {}
    for dp, _, fns in os.walk(path):
        for n in fns:
            p = os.path.join(dp, n)
            if n in ("lock", "lock.mdb"):  # the lock file's text and LMDB's reader table are not data
                continue
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = (os.path.getsize(p), os.stat(p).st_mtime_ns,
                                                 hashlib.sha256(f.read()).hexdigest())
    return out


@pytest.fixture
def enc(tmp_path, monkeypatch):
    """An encrypted repository opened by a key file (fast: no KDF), with one snapshot of make_src
    spread over several packs."""
    from store.ingest import create_snapshot

    key = str(tmp_path / "repo.key")
    keys = KeySource(key_file=key)
    repo = str(tmp_path / "repo")
    Repository.init(repo, encrypt=True, keys=keys, pack_size=128 * 1024).close()  # sealed packs, footers
    assert os.stat(key).st_mode & 0o777 == 0o600
    files = make_src(tmp_path / "src")
    monkeypatch.setenv("PIT_KEY_FILE", key)  # what conftest's helpers open with
    with Repository(repo, keys=keys) as r:
        snap = create_snapshot(r, "s", [str(tmp_path / "src")])
    return repo, keys, files, snap


# ------------------------------------------------------------------ the CLI round trip
def test_cli_init_snapshot_restore_verify_with_a_passphrase(tmp_path):
    repo = tmp_path / "repo"
    files = make_src(tmp_path / "src")
    env = pit_env(PIT_PASSWORD=PASS)
    out = run_pit(repo, "init", "--encrypt", env=env).stdout.decode()
    assert "encrypted with aes-256-gcm" in out
    cfg = json.loads((repo / "config").read_text())
    assert cfg["version"] == 3 and cfg["encryption"]["aead"] == "aes-256-gcm"
    [slot] = list_slots(str(repo))
    assert slot.type == "passphrase" and slot.record["kdf"]["algorithm"] in ("argon2id", "scrypt")
    run_pit(repo, "snapshot", "--set", "s", tmp_path / "src", env=env)
    run_pit(repo, "restore", "s@latest", "--target", tmp_path / "out", env=env)
    assert tree_bytes(tmp_path / "out" / "src") == files
    assert "result: clean" in run_pit(repo, "verify", env=env).stdout.decode()
    assert "result: clean" in run_pit(repo, "verify", "--deep", env=env).stdout.decode()
    assert_nothing_plain(str(repo), files, KeySource(passphrase=PASS))


def test_plain_stays_the_default(tmp_path):
    run_pit(tmp_path / "a", "init")
    run_pit(tmp_path / "b", "init", "--no-encrypt")
    for name in ("a", "b"):
        cfg = json.loads((tmp_path / name / "config").read_text())
        assert cfg["version"] == 2 and "encryption" not in cfg and not (tmp_path / name / "keys").exists()


def test_wrong_or_missing_key_is_refused_and_changes_nothing(tmp_path):
    repo = tmp_path / "repo"
    make_src(tmp_path / "src")
    run_pit(repo, "init", "--encrypt", env=pit_env(PIT_PASSWORD=PASS))
    run_pit(repo, "snapshot", "--set", "s", tmp_path / "src", env=pit_env(PIT_PASSWORD=PASS))
    before = state_of(repo)
    for args in (("snapshot", "--set", "s", tmp_path / "src"), ("snapshots",), ("repair",), ("key", "list")):
        p = run_pit(repo, *args, expect=WrongKey.exit_code, env=pit_env(PIT_PASSWORD="not it"))
        err = p.stderr.decode()
        assert err.startswith("pit: error: wrong passphrase") and err.count("\n") == 1, err
        p = run_pit(repo, *args, expect=KeyRequired.exit_code, env=pit_env())
        assert p.stderr.decode().count("\n") == 1
    other = tmp_path / "other.key"
    run_pit(tmp_path / "r2", "--key-file", other, "init", "--encrypt")
    p = run_pit(repo, "--key-file", other, "snapshots", expect=WrongKey.exit_code, env=pit_env())
    assert "opens no key slot" in p.stderr.decode()
    assert state_of(repo) == before
    with pytest.raises(WrongKey):
        Repository(str(repo), keys=KeySource(passphrase="nope"))


# ------------------------------------------------------------------ key slots
def test_key_add_list_remove(tmp_path):
    repo = tmp_path / "repo"
    kf = tmp_path / "agent.key"
    pw = pit_env(PIT_PASSWORD=PASS)
    run_pit(repo, "init", "--encrypt", env=pw)
    make_src(tmp_path / "src")
    run_pit(repo, "snapshot", "--set", "s", tmp_path / "src", env=pw)
    run_pit(repo, "key", "add", "--new-key-file", kf, env=pw)
    assert os.stat(kf).st_mode & 0o777 == 0o600
    slots = json.loads(run_pit(repo, "key", "list", "--json", env=pw).stdout)
    assert sorted(s["type"] for s in slots) == ["keyfile", "passphrase"]
    pass_slot = next(s["id"] for s in slots if s["type"] == "passphrase")
    key_slot = next(s["id"] for s in slots if s["type"] == "keyfile")
    assert [s["id"] for s in slots if s["in_use"]] == [pass_slot]
    by_key = pit_env(PIT_KEY_FILE=str(kf))
    assert len(json.loads(run_pit(repo, "snapshots", "--json", env=by_key).stdout)) == 1
    # the slot in use is refused (restic does the same), then removed through the other one
    p = run_pit(repo, "key", "remove", pass_slot, expect=KeySlotRefused.exit_code, env=pw)
    assert "unlocked with" in p.stderr.decode()
    run_pit(repo, "key", "remove", pass_slot[:6], env=by_key)
    run_pit(repo, "snapshots", expect=WrongKey.exit_code, env=pw)
    # the last slot is refused
    p = run_pit(repo, "key", "remove", key_slot, expect=KeySlotRefused.exit_code, env=by_key)
    assert "last" in p.stderr.decode()
    # a new passphrase slot; the old passphrase stays gone
    run_pit(repo, "key", "add", env=pit_env(PIT_KEY_FILE=str(kf), PIT_NEW_PASSWORD="second"))
    assert len(json.loads(run_pit(repo, "snapshots", "--json", env=pit_env(PIT_PASSWORD="second")).stdout)) == 1
    assert len(list_slots(str(repo))) == 2
    # a plain repository has no keys
    run_pit(tmp_path / "plain", "init")
    p = run_pit(tmp_path / "plain", "key", "list", expect=22)
    assert "not encrypted" in p.stderr.decode()


def test_a_slot_moved_to_another_repository_opens_nothing(tmp_path):
    key = str(tmp_path / "k")
    Repository.init(str(tmp_path / "a"), encrypt=True, keys=KeySource(key_file=key)).close()
    Repository.init(str(tmp_path / "b"), encrypt=True, keys=KeySource(key_file=key)).close()  # one key file, two repos
    [sa] = list_slots(str(tmp_path / "a"))
    [sb] = list_slots(str(tmp_path / "b"))
    moved = dict(sa.record, id=sb.id)  # a's wrapped master key under b's slot name
    (tmp_path / "b" / "keys" / sb.id).write_text(json.dumps(moved))
    with pytest.raises(WrongKey):
        Repository(str(tmp_path / "b"), keys=KeySource(key_file=key))


# ------------------------------------------------------------------ repair, compact, restore
def test_repair_rebuilds_the_index_of_an_encrypted_repository(enc, tmp_path):
    repo, keys, files, snap = enc
    before = blob_ids(repo, None)
    shutil.rmtree(os.path.join(repo, "index"))
    rep = rebuild_index(repo, keys=keys)
    assert rep.snapshots == 1 and not rep.quarantined and not rep.packs_damaged
    after = blob_ids(repo, None)
    assert {k: (e.kind, e.pack, e.offset, e.stored_len) for k, e in after.items()} == \
        {k: (e.kind, e.pack, e.offset, e.stored_len) for k, e in before.items()}
    from store.verify import verify

    with Repository(repo, keys=keys) as r:
        assert verify(r, depth="deep").clean
    _restore(repo, keys, snap, tmp_path / "out")
    assert tree_bytes(tmp_path / "out" / "src") == files


def test_compaction_copies_sealed_frames(enc, tmp_path):
    from store.compact import compact
    from store.ingest import create_snapshot
    from store.prune import drop_snapshot

    repo, keys, files, snap = enc
    old = list(blob_ids(repo, None)) + [snap.id]
    os.remove(tmp_path / "src" / "rand.bin")
    with Repository(repo, keys=keys) as r:
        s2 = create_snapshot(r, "s", [str(tmp_path / "src")])
        with r.writer() as w:
            drop_snapshot(w, snap)
        st = compact(r, threshold=0.0)
    assert st.packs_compacted >= 1
    _restore(repo, keys, s2, tmp_path / "out")
    assert tree_bytes(tmp_path / "out" / "src") == {k: v for k, v in files.items() if k != "rand.bin"}
    assert_nothing_plain(repo, files, keys, old)


def _restore(repo, keys, snap, target):
    with Repository(repo, readonly=True, keys=keys) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        Restorer(rd, fail_fast=True).restore(rd.lookup(snap.root, ""), str(target))


# ------------------------------------------------------------------ tampering
def _rewrite(path: str, off: int, change) -> None:
    """Apply `change(bytearray frame)` to the frame at `off` and fix up its CRC (so only the seal can tell)."""
    with open(path, "r+b") as f:
        f.seek(off)
        head = f.read(P.FRAME_HEADER.size)
        stored = P.FRAME_HEADER.unpack(head)[4]
        f.seek(off)
        frame = bytearray(f.read(P.FRAME_OVERHEAD + stored))
        change(frame)
        end = P.FRAME_HEADER.size + stored
        frame[end:end + 4] = struct.pack("<I", zlib.crc32(bytes(frame[:end])))
        f.seek(off)
        f.write(frame)


def _two_chunks(repo, keys, snap):
    with Repository(repo, readonly=True, keys=keys) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        entry = rd.lookup(snap.root, "src/rand.bin")
        ids = rd.chunk_list(entry).ids
        return [(cid, r.blob_entry(txn, cid)) for cid in ids[:2]]


def _damage_found(repo, keys, snap, tmp_path) -> None:
    from store.verify import verify

    with Repository(repo, keys=keys) as r:
        rep = verify(r, depth="deep")
    assert not rep.clean
    with pytest.raises(IntegrityError):
        _restore(repo, keys, snap, tmp_path / "out-ff")
    with Repository(repo, readonly=True, keys=keys) as r, r.reading() as txn:
        rd = ObjectReader(r, txn)
        with pytest.raises(DamageFound):
            Restorer(rd).restore(rd.lookup(snap.root, ""), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "src" / "rand.bin")  # nothing of it, no garbage


def test_a_flipped_ciphertext_byte_with_a_good_crc_is_damage(enc, tmp_path):
    repo, keys, files, snap = enc
    (cid, e), _ = _two_chunks(repo, keys, snap)

    def flip(frame):
        frame[P.FRAME_HEADER.size + 40] ^= 0x01
    _rewrite(pack_path(repo, e.pack), e.offset, flip)
    _damage_found(repo, keys, snap, tmp_path)
    run = run_pit(repo, "verify", "--deep", expect=DamageFound.exit_code, env=pit_env(PIT_KEY_FILE=keys.key_file))
    assert cid.hex()[:16] in run.stdout.decode() + run.stderr.decode()


def test_swapped_stored_ids_are_damage(enc, tmp_path):
    repo, keys, files, snap = enc
    (a, ea), (b, eb) = _two_chunks(repo, keys, snap)
    path = pack_path(repo, ea.pack)
    with open(path, "rb") as f:
        data = f.read()
    ida = data[eb.offset + 16:eb.offset + 48]
    idb = data[ea.offset + 16:ea.offset + 48]

    def put(new):
        def change(frame):
            frame[16:48] = new
        return change
    _rewrite(path, ea.offset, put(ida))
    _rewrite(path, eb.offset, put(idb))
    _damage_found(repo, keys, snap, tmp_path)


# ------------------------------------------------------------------ the codec itself
CODEC = SealedCodec("aes-256-gcm", bytes(range(64)))


def _open(frame: bytes, want: bytes | None = None) -> tuple[bytes, bytes]:
    _info, stored = P.decode_frame(frame)
    bid, payload = CODEC.open(frame, stored, want)
    return bid, bytes(payload)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from([P.CHUNK, P.TREE, P.FILELIST, P.SNAPSHOT, P.TOMBSTONE, P.SETTING]),
       flags=st.sampled_from([0, P.ZSTD]), bid=st.binary(min_size=32, max_size=32),
       payload=st.binary(max_size=300), where=st.integers(min_value=0), xor=st.integers(1, 255),
       fix_crc=st.booleans())
def test_sealed_frames_round_trip_and_reject_any_changed_byte(kind, flags, bid, payload, where, xor, fix_crc):
    frame = CODEC.encode(kind, flags, bid, payload, len(payload) + 7)
    assert len(frame) == P.FRAME_OVERHEAD + len(payload) + SEAL_OVERHEAD
    info, _ = P.decode_frame(frame)
    assert (info.kind, info.flags, info.raw_len, info.id) == (kind, flags, len(payload) + 7, CODEC.stored_id(bid))
    assert _open(frame, bid) == (bid, payload)
    assert bid not in frame and (len(payload) < 8 or payload not in frame)
    bad = bytearray(frame)
    i = where % len(bad)
    bad[i] ^= xor
    end = len(bad) - 4
    if fix_crc and i < end:
        bad[end:] = struct.pack("<I", zlib.crc32(bytes(bad[:end])))
    with pytest.raises(IntegrityError):
        _open(bytes(bad))


def test_stored_ids_depend_on_the_key_and_each_frame_has_its_own_nonce():
    other = SealedCodec("aes-256-gcm", bytes(range(1, 65)))
    bid = b"\x11" * 32
    assert CODEC.stored_id(bid) != other.stored_id(bid) != bid
    f1, f2 = CODEC.encode(P.CHUNK, 0, bid, b"same", 4), CODEC.encode(P.CHUNK, 0, bid, b"same", 4)
    assert f1[:48] == f2[:48] and f1[48:] != f2[48:]
    with pytest.raises(IntegrityError):
        _info, stored = P.decode_frame(f1)
        other.open(f1, stored)
    with pytest.raises(IntegrityError):  # a frame of another blob id where the index expects this one
        _open(f1, b"\x22" * 32)


def test_worker_processes_seal_what_they_encode(tmp_path, monkeypatch):
    """Ingest's worker processes get the key material and seal the chunks they encode."""
    from store import ingest
    from store.ingest import create_snapshot

    monkeypatch.setattr(ingest, "POOL_AFTER", 0)
    monkeypatch.setattr(ingest, "SEGMENT_BYTES", 256 * 1024)
    keys = KeySource(key_file=str(tmp_path / "k"))
    repo = str(tmp_path / "repo")
    Repository.init(repo, encrypt=True, keys=keys).close()
    files = make_src(tmp_path / "src")
    with open(tmp_path / "src" / "big.bin", "wb") as f:
        f.write(rand_bytes(3_000_000, "enc-big"))
    with Repository(repo, keys=keys) as r:
        snap = create_snapshot(r, "s", [str(tmp_path / "src")])
        assert r.codec.sealed
    _restore(repo, keys, snap, tmp_path / "out")
    got = tree_bytes(tmp_path / "out" / "src")
    assert got.pop("big.bin") == rand_bytes(3_000_000, "enc-big") and got == files
    assert_nothing_plain(repo, files, keys)


# ------------------------------------------------------------------ replication into an encrypted replica
def test_a_plain_master_replicates_into_an_encrypted_replica(cluster, tmp_path, monkeypatch):
    """The wire carries logical ids and zstd payloads; the replica seals them with its own key (its agent
    file's key_file), so its snapshot restores byte for byte and its packs hold no plain id."""
    from test_repl_helpers import pit, read_tree, replica_snapshots, wait_for, write

    c = cluster(replicas=1)
    key = str(tmp_path / "replica.key")

    def add_encrypted(r, start=True):
        os.makedirs(r.dir, exist_ok=True)
        token = pit("cluster", "token", "--state", c.primary.state).stdout.strip()
        pit("join", "--state", r.state, token, "--node", r.name, "--address", r.address)
        pit("--repo", r.repo, "--key-file", key, "init", "--encrypt")
        r.write_config(f'key_file = "{key}"')
        if start:
            r.start()

    c.add = add_encrypted
    files = {"rand.bin": rand_bytes(300_000, "repl-rand"), "marker.txt": MARKER * 3000,
             "small.txt": MARKER + b" alone\n"}
    for name, data in files.items():
        write(os.path.join(c.src, name), data)
    monkeypatch.delenv("PIT_KEY_FILE", raising=False)
    monkeypatch.delenv("PIT_PASSWORD", raising=False)
    c.start()  # the agents get no key in their environment: the replica's comes from its agent file
    r = c.replicas[0]
    monkeypatch.setenv("PIT_KEY_FILE", key)  # for this process's reads of the replica's repository
    wait_for(lambda: c.converged(r), 60, "seeding the encrypted replica")
    c.primary.ctl("point", "--set", "web")
    snaps = replica_snapshots(r.repo, "web")
    assert snaps and snaps[-1][1] == read_tree(c.src)
    with Repository(r.repo, readonly=True) as repo:
        assert repo.codec.sealed
    _restore(r.repo, KeySource(key_file=key), snaps[-1][0], tmp_path / "out")
    assert tree_bytes(tmp_path / "out" / "data") == files
    assert_nothing_plain(r.repo, files, KeySource(key_file=key))


def test_the_by_hand_reader_of_format_md_reads_an_encrypted_repository(enc, tmp_path):
    """docs/format.md section 11's script with section 12.7's changes, assembled as 12.7 says, reads files
    of an encrypted repository without our code: the page documents every byte it needs."""
    import re
    import subprocess
    import sys

    repo, keys, files, snap = enc
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "format.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    by_hand = next(b for b in blocks if "def read_file" in b)
    changes = next(b for b in blocks if "def master_key" in b)
    main = by_hand.index('if __name__ == "__main__":')
    script = by_hand[:main].replace("import blake3, msgpack, zstandard\n",
                                    "import blake3, msgpack, zstandard\n" + changes, 1)
    for old, new in (("    body = data[off + 48:off + 48 + stored]\n",
                      "    bid_seen, body = open_frame(data, off, stored)\n    assert bid_seen == bid\n"),
                     ("            for kind, flags, off, stored, raw, bid in frames_of(data):\n",
                      "            for kind, flags, off, stored, raw, bid in frames_of(data):\n"
                      "                bid, _payload = open_frame(data, off, stored)\n")):
        assert script.count(old) == 1
        script = script.replace(old, new)
    path = tmp_path / "read_by_hand.py"
    path.write_text(script + by_hand[main:])
    env = dict(os.environ, PIT_KEY_FILE=keys.key_file)
    env.pop("PIT_PASSWORD", None)
    for name in ("marker.txt", "rand.bin"):
        p = subprocess.run([sys.executable, str(path), repo, snap.id.hex()[:12], f"src/{name}"],
                           capture_output=True, env=env, timeout=60)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        assert p.stdout == files[name]


def test_the_webdav_body_reads_an_encrypted_repository_and_refuses_a_forged_frame(enc):
    """davserver/body.py reads runs of frames itself: through the codec, so sealed frames open, and a
    ciphertext byte changed under a recomputed CRC is an IntegrityError, never other bytes."""
    from davserver import body as B
    from store.view import ALL, View

    repo, keys, files, snap = enc
    with Repository(repo, readonly=True, keys=keys) as r:
        view = View(r, ALL)
        for name, data in files.items():
            vf = view.open(view.resolve(["s", "latest", "src", name]))
            assert B.Body(vf).read() == data
        vf = view.open(view.resolve(["s", "latest", "src", "rand.bin"]))
        cid = vf.chunks.ids[1]
        with r.reading() as txn:
            e = r.blob_entry(txn, cid)

    def flip(frame):
        frame[P.FRAME_HEADER.size + 100] ^= 0x40
    _rewrite(pack_path(repo, e.pack), e.offset, flip)
    with Repository(repo, readonly=True, keys=keys) as r:
        view = View(r, ALL)
        with pytest.raises(IntegrityError):
            B.Body(view.open(view.resolve(["s", "latest", "src", "rand.bin"]))).read()


def test_deep_verify_in_worker_processes_opens_sealed_frames(enc, monkeypatch):
    """verify --deep hands the codec's key material to its worker processes: they check sealed chunks and
    find one forged under a good CRC."""
    from store import verify as V

    repo, keys, files, snap = enc
    monkeypatch.setattr(V, "PARALLEL_MIN", 0)
    with Repository(repo, keys=keys) as r:
        rep = V.verify(r, depth="deep")
    assert rep.clean and not rep.notes, rep.notes  # no note: the workers ran
    (cid, e), _ = _two_chunks(repo, keys, snap)

    def flip(frame):
        frame[P.FRAME_HEADER.size + 20] ^= 0x08
    _rewrite(pack_path(repo, e.pack), e.offset, flip)
    with Repository(repo, keys=keys) as r:
        rep = V.verify(r, depth="deep")
    assert not rep.notes, rep.notes
    assert [d.blob for d in rep.damage] == [cid.hex()]
