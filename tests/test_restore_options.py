"""`pit restore` options (store/restore.py): --include/--exclude, --dry-run, --overwrite
always|if-changed|if-newer|never (default if-newer: a file changed in the target since is kept and
named), --delete, --verify. Real repositories, real targets; hostile targets and patterns."""
from __future__ import annotations

import json
import os

import pytest

from conftest import cli, files_digest, make_tree, snapshot
from store.errors import InvalidArgument, RestoreVerifyFailed, UnsafePath
from store.objects import ObjectReader
from store.repository import Repository
from store.restore import target_matches
from store.snapshots import resolve

OLD = 1_600_000_000 * 10**9


@pytest.fixture
def site(repo_path, tmp_path):
    src = tmp_path / "www"
    make_tree(src, {"index.html": b"home", "a.tmp": b"tmp", "Notes.TXT": b"notes",
                    "img": {"x.png": b"png" * 100, "y.png": b"y"},
                    "docs": {"report.txt": b"report", "old": {"r2.txt": b"r2"}},
                    b"caf\xe9.txt": b"latin-1"})
    snapshot(repo_path, "s", src)
    return repo_path, src


def restored(target) -> set[str]:
    return {os.fsdecode(p) for p in files_digest(target)}


def test_include_and_exclude(site, tmp_path):
    repo, _ = site
    t = tmp_path / "t1"
    cli(repo, "restore", "s@latest", "--target", t, "--include", "*.txt")
    assert restored(t) == {"www", "www/docs", "www/docs/report.txt", "www/docs/old", "www/docs/old/r2.txt",
                           "www/caf\udce9.txt"}
    t = tmp_path / "t2"
    cli(repo, "restore", "s@latest", "--target", t, "--iinclude", "*.txt", "--exclude", "old/")
    assert restored(t) == {"www", "www/Notes.TXT", "www/docs", "www/docs/report.txt", "www/caf\udce9.txt"}
    t = tmp_path / "t3"  # a directory included brings everything under it; absolute paths of the source work
    cli(repo, "restore", "s@latest", "--target", t, "--include", f"{site[1]}/img", "--iexclude", "Y.PNG")
    assert restored(t) == {"www", "www/img", "www/img/x.png"}
    t = tmp_path / "t4"  # a subtree of the snapshot, with patterns still on the snapshot's paths
    cli(repo, "restore", "s@latest:www/docs", "--target", t, "--exclude", "/www/docs/old")
    assert restored(t) == {"docs", "docs/report.txt"}


@pytest.mark.parametrize("args, code", [
    (["--include", "../etc"], InvalidArgument.exit_code),
    (["--exclude", "a/../../b"], InvalidArgument.exit_code),
    (["--include", "/etc/passwd"], InvalidArgument.exit_code),
    (["--exclude", "x\\"], InvalidArgument.exit_code),
    (["--overwrite", "sometimes"], 2),
])
def test_bad_options_change_nothing(site, tmp_path, args, code):
    repo, _ = site
    t = tmp_path / "never-made"
    res = cli(repo, "restore", "s@latest", "--target", t, *args, expect=code)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(("pit: error: ", "Usage:", "pit: usage"))
    assert not t.exists()


def _edit(path, data, mtime_ns):
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_default_keeps_what_the_user_changed_since(site, tmp_path):
    repo, _ = site
    t = tmp_path / "t"
    cli(repo, "restore", "s@latest", "--target", t)
    _edit(t / "www" / "index.html", b"my edit", OLD * 2)        # changed in the target after the snapshot
    _edit(t / "www" / "a.tmp", b"older", OLD)                   # an older copy: the snapshot's is newer
    res = cli(repo, "restore", "s@latest", "--target", t)
    assert (t / "www" / "index.html").read_bytes() == b"my edit"
    assert (t / "www" / "a.tmp").read_bytes() == b"tmp"
    assert "kept www/index.html" in res.stderr and "--overwrite always" in res.stderr
    doc = json.loads(cli(repo, "restore", "s@latest", "--target", t, "--json").stdout)
    assert doc["kept"] == ["www/index.html"] and doc["overwritten"] == 0


@pytest.mark.parametrize("policy, index_html, a_tmp, same", [
    ("always", b"home", b"tmp", b"home"),
    ("if-changed", b"home", b"tmp", None),
    ("if-newer", b"my edit", b"tmp", None),
    ("never", b"my edit", b"older", None),
])
def test_overwrite_policies(site, tmp_path, policy, index_html, a_tmp, same):
    repo, _ = site
    t = tmp_path / "t"
    cli(repo, "restore", "s@latest", "--target", t)
    _edit(t / "www" / "index.html", b"my edit", OLD * 2)
    _edit(t / "www" / "a.tmp", b"older", OLD)
    # same content, other mtime: if-changed reads it back and only puts the time right
    png = t / "www" / "img" / "x.png"
    ino = png.stat().st_ino
    os.utime(png, ns=(OLD, OLD))
    doc = json.loads(cli(repo, "restore", "s@latest", "--target", t, "--overwrite", policy, "--json").stdout)
    assert (t / "www" / "index.html").read_bytes() == index_html
    assert (t / "www" / "a.tmp").read_bytes() == a_tmp
    if policy == "if-changed":
        assert png.stat().st_ino == ino and png.stat().st_mtime_ns != OLD  # not rewritten, mtime restored
    if policy == "always":
        assert doc["overwritten"] == 8 and doc["kept"] == []


def test_dry_run_writes_nothing_and_says_everything(site, tmp_path):
    repo, _ = site
    t = tmp_path / "t"
    doc = json.loads(cli(repo, "restore", "s@latest", "--target", t, "--dry-run", "--json").stdout)
    assert not t.exists()
    assert {a["action"] for a in doc["actions"]} == {"create", "write"} and doc["write"] == 8
    cli(repo, "restore", "s@latest", "--target", t)
    _edit(t / "www" / "index.html", b"my edit", OLD * 2)
    _edit(t / "www" / "a.tmp", b"older", OLD)
    (t / "www" / "stray").write_bytes(b"not in the snapshot")
    before = files_digest(t)
    out = cli(repo, "restore", "s@latest", "--target", t, "-n", "--delete").stdout
    assert files_digest(t) == before
    assert "would keep (differs, --overwrite if-newer): www/index.html" in out
    assert "would overwrite www/a.tmp" in out.replace("  ", " ").replace("  ", " ")
    assert "would delete" in out and "www/stray" in out and "nothing was written" in out


def test_delete_makes_the_target_match_within_the_selection(site, tmp_path):
    repo, _ = site
    t = tmp_path / "t"
    cli(repo, "restore", "s@latest", "--target", t)
    (t / "www" / "stray.txt").write_bytes(b"x")
    (t / "www" / "stray.bin").write_bytes(b"y")
    os.mkdir(t / "www" / "img" / "straydir")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    os.symlink(outside, t / "www" / "img" / "link-out")      # deleted as a link, never followed
    cli(repo, "restore", "s@latest", "--target", t, "--delete", "--include", "*.txt", "--include", "img/")
    assert not (t / "www" / "stray.txt").exists()            # selected by *.txt: deleted
    assert (t / "www" / "stray.bin").exists()                # outside the selection: left alone
    assert not (t / "www" / "img" / "straydir").exists() and not os.path.lexists(t / "www" / "img" / "link-out")
    assert (outside / "precious").read_bytes() == b"keep me"
    cli(repo, "restore", "s@latest", "--target", t, "--delete")
    assert not (t / "www" / "stray.bin").exists()
    assert restored(t) == restored_of(repo, tmp_path)


def restored_of(repo, tmp_path):
    t = tmp_path / "fresh"
    cli(repo, "restore", "s@latest", "--target", t)
    return restored(t)


def test_a_symlink_in_the_target_is_refused_in_a_dry_run_too(site, tmp_path):
    repo, _ = site
    t = tmp_path / "t"
    (t / "www").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, t / "www" / "img")
    out = cli(repo, "restore", "s@latest", "--target", t, "-n").stdout
    assert "would refuse (not a directory in the target): www/img" in out
    res = cli(repo, "restore", "s@latest", "--target", t, expect=UnsafePath.exit_code)
    assert res.stderr.count("\n") == 1
    assert list(outside.iterdir()) == []


def test_verify_reads_back(site, tmp_path):
    repo, _ = site
    t = tmp_path / "t"
    doc = json.loads(cli(repo, "restore", "s@latest", "--target", t, "--verify", "--json").stdout)
    assert doc["verified"] == doc["files"] == 8
    # what verify compares: each chunk's BLAKE3 against its id, from the target's bytes
    r = Repository(str(repo), readonly=True)
    try:
        with r.reading() as txn:
            reader = ObjectReader(r, txn)
            e = reader.lookup(resolve(r, txn, "s@latest").root, "www/img/x.png")
            cl = reader.chunk_list(e)
            p = t / "www" / "img" / "x.png"
            with open(p, "rb") as f:
                assert target_matches(f.fileno(), e, cl)
            data = bytearray(p.read_bytes())
            data[10] ^= 1
            p.write_bytes(bytes(data))
            with open(p, "rb") as f:
                assert not target_matches(f.fileno(), e, cl)
    finally:
        r.close()
    assert RestoreVerifyFailed.exit_code == 29


def test_a_sync_restore_leaves_excluded_names_alone(site, tmp_path):
    """What failover's sync restore can be given: the set's excludes are not the image's to delete."""
    from conftest import opened
    from store.restore import Restorer, Selection

    repo, src = site
    t = tmp_path / "live"
    cli(repo, "restore", "s@latest", "--target", t)
    (t / "www" / "postmaster.pid").write_bytes(b"4242")   # excluded from the set: the server's own
    (t / "www" / "stray").write_bytes(b"not in the image")
    with opened(repo, readonly=True) as r, r.reading() as txn:
        reader = ObjectReader(r, txn)
        root = reader.lookup(resolve(r, txn, "s@latest").root, "")
        sel = Selection(exclude=["postmaster.pid"], sources=[str(src)])
        Restorer(reader, sync=True, selection=sel).restore(root, str(t))
    assert (t / "www" / "postmaster.pid").read_bytes() == b"4242"
    assert not (t / "www" / "stray").exists()


def test_pattern_files(site, tmp_path):
    repo, _ = site
    inc, exc = tmp_path / "inc", tmp_path / "exc"
    inc.write_bytes(b"# what to take back\ndocs/\n")
    exc.write_bytes(b"old/\n")
    t = tmp_path / "t"
    cli(repo, "restore", "s@latest", "--target", t, "--include-file", inc, "--exclude-file", exc)
    assert restored(t) == {"www", "www/docs", "www/docs/report.txt"}
    res = cli(repo, "restore", "s@latest", "--target", tmp_path / "u", "--include-file", tmp_path / "none",
              expect=18)
    assert res.stderr.count("\n") == 1 and not (tmp_path / "u").exists()
