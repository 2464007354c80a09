"""Issue 12, item 2: what a damaged, unreadable or read-only index does to `pit`.

Symptoms seen by a tester, each a regression test here:
- a truncated `index/data.mdb` killed every command with SIGBUS (exit 135, no
  message): now IndexDamaged (its own exit code, "run `pit repair`"), found
  before LMDB maps the file, and `pit repair` still rebuilds the index;
- overwritten pages gave exit 70 "internal error: ... MDB_CORRUPTED ...
  please report it": now IndexDamaged too;
- a permission problem on the index said "run pit repair": now
  PermissionDenied, naming the path;
- `pit verify` failed on a read-only repository (`Read-only file system:
  .../lock`): now it checks all the same and says it recorded nothing;
  writing commands fail with ReadOnlyRepository.
Real files, real LMDB, real `pit` processes (exit codes and signals are the point)."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile

import lmdb
import pytest

from maint_helpers import (
    assert_verify_clean, flip_byte, init_repo, make_tree, opened, pit, pit_cmd, pit_env, pit_json, restore_digest,
    snap, snapshot_ids, source_digest, write_file,
)
import store.errors as E
from store.index import _read_meta, _named_roots, data_file_problem

DAMAGE = 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    repo = init_repo(str(d / "repo"), pack_mib=1, avg_chunk=1024)
    rng = random.Random(71)
    src = str(d / "src")
    make_tree(src, rng, nfiles=40, size_range=(2_000, 40_000))
    digests = {}
    for _ in range(3):
        s = snap(repo, "a", [src])
        digests[s.hex] = source_digest(src)
        write_file(os.path.join(src, f"n{len(digests)}.bin"), rng.randbytes(30_000))
    return repo, src, digests


@pytest.fixture
def env(base, tmp_path):
    repo, src, digests = base
    dst = str(tmp_path / "repo")
    shutil.copytree(repo, dst)
    return dst, src, dict(digests)


def run(repo, *args) -> subprocess.CompletedProcess:
    return subprocess.run(pit_cmd(repo, *args), capture_output=True, timeout=120, env=pit_env())


def assert_typed(p: subprocess.CompletedProcess, cls: type, *words: str) -> str:
    err = p.stderr.decode(errors="replace")
    how = f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit {p.returncode}"
    assert p.returncode == cls.exit_code, f"wanted {cls.__name__} ({cls.exit_code}), got {how}: {err!r}"
    assert err.startswith("pit: error: ") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err and "internal error" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def data_mdb(repo) -> str:
    return os.path.join(repo, "index", "data.mdb")


def current_meta(repo):
    with open(data_mdb(repo), "rb") as f:
        first = f.read(4096)
        m0 = _read_meta(first)
        f.seek(m0[0])
        m1 = _read_meta(f.read(4096))
    return max((m for m in (m0, m1) if m), key=lambda m: m[2])


def assert_repair_restores(repo, digests) -> None:
    pit(repo, "repair")
    assert sorted(snapshot_ids(repo)) == sorted(digests)
    for sid, d in digests.items():
        assert restore_digest(repo, sid) == d
    assert_verify_clean(repo)


# --------------------------------------------------------------- truncated


def test_meta_pages_read_as_lmdb_reads_them(env):
    """The check reads the meta pages itself (LMDB would map the file first):
    it must agree with what LMDB says of the same file."""
    repo, _, _ = env
    psize, last, txnid, _free, _main = current_meta(repo)
    env_ = lmdb.open(os.path.join(repo, "index"), readonly=True, max_dbs=32)
    try:
        info = env_.info()
        assert (psize, last, txnid) == (env_.stat()["psize"], info["last_pgno"], info["last_txnid"])
    finally:
        env_.close()
    assert data_file_problem(os.path.join(repo, "index")) is None


@pytest.mark.parametrize("cut", ["to-100-bytes", "mid-page", "half-whole-pages", "two-pages", "last-root"])
def test_truncated_index_is_a_typed_error_not_sigbus(env, cut):
    repo, src, digests = env
    size = os.path.getsize(data_mdb(repo))
    psize, last, _txn, free_root, main_root = current_meta(repo)
    with open(data_mdb(repo), "rb") as f:
        f.seek(main_root * psize)
        roots = [r for r in _named_roots(f.read(psize)) + [main_root, free_root] if r < (1 << 63)]
    new = {"to-100-bytes": 100, "mid-page": size - psize - 123, "half-whole-pages": (size // psize // 2) * psize,
           "two-pages": 2 * psize, "last-root": max(roots) * psize}[cut]  # just one root page gone
    os.truncate(data_mdb(repo), new)
    for args in (["snapshots"], ["ls", "a@latest"], ["verify"], ["stats"],
                 ["snapshot", "--set", "a", src], ["forget", "--set", "a", "a@latest"], ["compact"]):
        assert_typed(run(repo, *args), E.IndexDamaged, "pit repair")
    assert_repair_restores(repo, digests)


# -------------------------------------------------------------- overwritten


def _zero_page(repo, pgno: int, psize: int) -> None:
    with open(data_mdb(repo), "r+b") as f:
        f.seek(pgno * psize)
        f.write(bytes(psize))


@pytest.mark.parametrize("which", ["main", "blobs", "refs", "snapshots", "packs", "meta-db"])
def test_overwritten_index_page_is_index_damage(env, which):
    """A zeroed page where LMDB keeps a database's root: LMDB says MDB_CORRUPTED
    (or MDB_PAGE_NOTFOUND, MDB_BAD_TXN after one); `pit` says IndexDamaged."""
    repo, src, digests = env
    psize, _last, _txn, _free, main_root = current_meta(repo)
    with opened(repo) as r, r.reading() as txn:
        with txn.cursor() as cur:  # the main database: one record per named database
            names = [bytes(k) for k in cur.iternext(keys=True, values=False)]
    with open(data_mdb(repo), "rb") as f:
        f.seek(main_root * psize)
        roots = dict(zip(names, _named_roots(f.read(psize))))
    pgno = main_root if which == "main" else roots[b"meta" if which == "meta-db" else which.encode()]
    _zero_page(repo, pgno, psize)
    p = run(repo, "verify")  # reads every database verify needs, and records its result
    assert_typed(p, E.IndexDamaged, "pit repair")
    for args in (["snapshots"], ["ls", "a@latest"], ["snapshot", "--set", "b", src]):
        p = run(repo, *args)
        if p.returncode != 0:  # a command that never reads the page works
            assert_typed(p, E.IndexDamaged, "pit repair")
    assert_repair_restores(repo, digests)


def test_garbage_in_the_meta_pages(env):
    repo, _, digests = env
    with open(data_mdb(repo), "r+b") as f:
        f.write(b"\x00" * 8192)
    assert_typed(run(repo, "snapshots"), E.IndexDamaged, "pit repair", "data.mdb")
    assert_repair_restores(repo, digests)


# -------------------------------------------------------------- permissions


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run_as_nobody(repo, *args) -> subprocess.CompletedProcess:
    return subprocess.run(AS_NOBODY + pit_cmd(repo, *args), capture_output=True, timeout=120, env=pit_env(), cwd="/")


@pytest.fixture
def shared(base):
    """A copy of the repository another user can reach (pytest's own directories are 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run pit as another user")
    top = tempfile.mkdtemp(prefix="pit-perm-")
    os.chmod(top, 0o755)
    repo = os.path.join(top, "repo")
    shutil.copytree(base[0], repo)
    try:
        p = subprocess.run(AS_NOBODY + pit_cmd(repo, "--version")[:1] + ["--version"], capture_output=True,
                           env=pit_env(), cwd="/")
    except OSError as exc:  # pragma: no cover - no setpriv
        p = subprocess.CompletedProcess([], 1, b"", str(exc).encode())
    if p.returncode != 0:  # pragma: no cover - no setpriv, or pit not runnable by nobody here
        shutil.rmtree(top)
        pytest.skip(f"cannot run pit as user nobody here: {p.stderr.decode(errors='replace').strip()[-200:]}")
    for dp, dns, fns in os.walk(repo):
        for n in dns:
            os.chmod(os.path.join(dp, n), 0o755)
        for n in fns:
            os.chmod(os.path.join(dp, n), 0o644)
    try:
        yield repo, base[2]
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_unreadable_index_is_a_permission_problem_not_damage(shared):
    repo, digests = shared
    index = os.path.join(repo, "index")
    os.chmod(index, 0o700)  # not searchable by others
    for args in (["snapshots"], ["verify"], ["ls", "a@latest"]):
        err = assert_typed(run_as_nobody(repo, *args), E.PermissionDenied, index)
        assert "repair" not in err.replace("`pit repair` would not help", ""), err
    os.chmod(index, 0o755)
    os.chmod(os.path.join(index, "lock.mdb"), 0o600)  # readers write their slot in it
    assert_typed(run_as_nobody(repo, "snapshots"), E.PermissionDenied, os.path.join(index, "lock.mdb"))
    os.chmod(os.path.join(index, "lock.mdb"), 0o644)
    os.chmod(os.path.join(index, "data.mdb"), 0o600)
    assert_typed(run_as_nobody(repo, "snapshots"), E.PermissionDenied, os.path.join(index, "data.mdb"))


def test_read_only_for_this_user_verify_still_checks(shared):
    """Everything readable, nothing writable (the writer lock, the index):
    reading commands and verify work; a snapshot names the path it cannot write."""
    repo, digests = shared
    os.chmod(os.path.join(repo, "index", "lock.mdb"), 0o666)  # a reader's slot only
    p = run_as_nobody(repo, "snapshots")
    assert p.returncode == 0, p.stderr
    p = run_as_nobody(repo, "verify")
    assert p.returncode == 0, p.stderr
    assert b"results not recorded" in p.stdout and b"result: clean" in p.stdout
    assert_typed(run_as_nobody(repo, "snapshot", "--set", "a", "/etc/hostname"), E.PermissionDenied,
                 os.path.join(repo, "lock"))


# ----------------------------------------------------- read-only file system


@pytest.fixture
def ro_mount(env, tmp_path):
    repo, src, digests = env
    mnt = tmp_path / "ro"
    mnt.mkdir()
    p = subprocess.run(["mount", "--bind", "-o", "ro", repo, str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {p.stderr.decode().strip()}")
    try:
        if os.access(str(mnt), os.W_OK):  # older kernels ignore ro on the first bind: remount
            subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        yield str(mnt), repo, src, digests
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        if os.path.ismount(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_verify_works_on_a_read_only_file_system(ro_mount, tmp_path):
    mnt, repo, src, digests = ro_mount
    out, _ = pit_json(mnt, "verify", "--deep")
    assert out["result"] == "good" and not out["recorded"]
    assert any("not recorded" in n and "read-only" in n for n in out["notes"]), out["notes"]
    text = pit(mnt, "verify").stdout.decode()
    assert "note: results not recorded" in text and "result: clean" in text
    # the other reading commands work there too
    pit(mnt, "snapshots")
    pit(mnt, "ls", "a@latest")
    pit(mnt, "restore", "a@latest", "--target", str(tmp_path / "out"))
    # writing commands say why they cannot
    for args in (["snapshot", "--set", "a", src], ["forget", "--set", "a", "a@latest"], ["repair"], ["compact"]):
        assert_typed(run(mnt, *args), E.ReadOnlyRepository, "read-only file system")


def test_verify_reports_damage_on_a_read_only_file_system(env, tmp_path):
    repo, src, digests = env
    from maint_helpers import all_blobs, pack_path
    from store import packs as P

    e = max(all_blobs(repo).values(), key=lambda e: e.stored_len)
    flip_byte(pack_path(repo, e.pack), e.offset + P.FRAME_HEADER.size + 5)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", repo, str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount read-only here")
    try:
        if os.access(str(mnt), os.W_OK):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        out, _ = pit_json(str(mnt), "verify", "--deep", expect=DAMAGE)
        assert out["damage"] and not out["recorded"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
