"""The CLI error contract (like borg's return_codes_test): every StoreError
subclass has its own exit code, and `pit` reports each anticipated condition
as exactly one line `pit: error: ...` on stderr, with that code and no
traceback. Real `pit` processes (exit codes are the point)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import store.errors as E
from conftest import (PIT, ROOT, add_crafted_snapshots, cli, colliding_records, init_repo, make_tree, opened,
                      pit_env, rand_bytes, run_pit, snapshot)
from store import packs as P
from store.objects import ObjectReader


def all_store_errors() -> list[type]:
    """Every error class `pit` turns into an exit code: the store's and those of the packages that add
    commands (imported here, not left to whichever other test this worker ran first)."""
    import davserver.errors  # noqa: F401
    import replicator.errors  # noqa: F401

    out, todo = [], [E.StoreError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def one_line_error(p: subprocess.CompletedProcess, cls: type) -> str:
    err = p.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert p.returncode == cls.exit_code, f"wanted {cls.__name__} ({cls.exit_code}), got {p.returncode}: {err}"
    assert err.startswith("pit: error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert len(err) > len("pit: error: ") + 5
    assert "internal error" not in err
    return err


def pit_fails(repo, *args, cls: type, env=None, input=None, stdout_empty: bool = True, timeout: float = 60) -> str:
    try:
        p = run_pit(repo, *args, expect=None, env=env, input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pit {' '.join(map(str, args))} hung for {timeout} s instead of failing "
                             f"with {cls.__name__}") from None
    err = one_line_error(p, cls)
    if stdout_empty:
        assert p.stdout == b"", p.stdout[:200]
    return err


def test_exit_codes_are_distinct():
    classes = all_store_errors()
    codes = {}
    for cls in classes:
        assert isinstance(cls.exit_code, int) and 1 <= cls.exit_code <= 125, cls
        assert cls.exit_code not in codes, f"{cls.__name__} and {codes.get(cls.exit_code)} share {cls.exit_code}"
        codes[cls.exit_code] = cls.__name__
        assert cls.exit_code != 2 or cls is E.StoreError  # 2 is click's usage error
        # the default message is the docstring's first line: present and one line
        assert str(cls()).strip() and "\n" not in str(cls())
    assert len(codes) == len(classes) >= 17


def test_default_message_is_the_docstring():
    assert str(E.DiskFull()) == "No space left on the device; the operation was abandoned and nothing committed " \
                                "was harmed."


@pytest.fixture
def world(tmp_path):
    repo = init_repo(tmp_path / "repo")
    make_tree(tmp_path / "src", {"f": b"file", "big": rand_bytes(300_000, "big"), "d": {"g": b"g"}})
    snap = snapshot(repo, "s", tmp_path / "src")
    return repo, snap, tmp_path


# ------------------------------------------------------------ repository
def test_no_repository(tmp_path):
    for args in (["snapshots"], ["ls", "x@latest"], ["snapshot", "--set", "s", str(tmp_path)], ["stats"],
                 ["restore", "x@latest", "--target", str(tmp_path / "out")]):
        err = pit_fails(tmp_path / "nothing-here", *args, cls=E.RepositoryNotFound)
        assert "pit init" in err
    assert not (tmp_path / "nothing-here").exists()
    assert not (tmp_path / "out").exists()


def test_no_repository_given(tmp_path):
    p = subprocess.run([PIT, "snapshots"], capture_output=True, env=pit_env())
    one_line_error(p, E.InvalidArgument)
    p = subprocess.run([PIT, "snapshots", "--json"], capture_output=True, env=pit_env(PIT_REPO=init_repo(tmp_path / "r")))
    assert p.returncode == 0 and json.loads(p.stdout) == []


def test_repository_exists(world, tmp_path):
    repo, _, _ = world
    pit_fails(repo, "init", cls=E.RepositoryExists)
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "precious").write_bytes(b"keep me")
    pit_fails(tmp_path / "full", "init", cls=E.RepositoryExists)
    assert os.listdir(tmp_path / "full") == ["precious"]


@pytest.mark.parametrize("edit", [{"version": 1}, {"version": 3}, {"version": 99}, {"version": "2"}, {"format": "borg"}])
def test_wrong_or_newer_format_version(world, edit):
    repo, snap, tmp_path = world
    cfg_path = os.path.join(repo, "config")
    cfg = json.load(open(cfg_path))
    cfg.update(edit)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    for args in (["snapshots"], ["cat", f"{snap.hex}:src/f"], ["snapshot", "--set", "s", str(tmp_path / "src")]):
        pit_fails(repo, *args, cls=E.FormatVersionError)


def test_unreadable_config(world):
    repo, _, _ = world
    with open(os.path.join(repo, "config"), "w") as f:
        f.write("{not json")
    pit_fails(repo, "snapshots", cls=E.RepositoryNotFound)


def test_index_missing(world):
    repo, _, _ = world
    os.unlink(os.path.join(repo, "index", "data.mdb"))
    err = pit_fails(repo, "snapshots", cls=E.IndexMissing)
    assert "pit repair" in err


# -------------------------------------------------------------- snapshots
def test_unknown_snapshot(world):
    repo, snap, _ = world
    for spec in ("0000000000", "s@-5", "nosuchset@latest", "2001-01-01T00.00.00Z", "zz"):
        pit_fails(repo, "ls", spec, cls=E.SnapshotNotFound)
    pit_fails(repo, "cat", "deadbeef:src/f", cls=E.SnapshotNotFound)
    pit_fails(repo, "diff", snap.hex, "s@-1", cls=E.SnapshotNotFound)


def test_ambiguous_prefix(world):
    repo, snap, tmp_path = world
    prefix, recs = colliding_records(snap)
    add_crafted_snapshots(repo, snap, recs)
    err = pit_fails(repo, "ls", prefix, cls=E.AmbiguousSnapshot)
    assert prefix in err
    pit_fails(repo, "restore", prefix, "--target", tmp_path / "out", cls=E.AmbiguousSnapshot)
    assert not (tmp_path / "out").exists()


def test_path_not_in_snapshot(world):
    repo, snap, tmp_path = world
    pit_fails(repo, "cat", f"{snap.hex}:src/missing", cls=E.PathNotFound)
    pit_fails(repo, "ls", "s@latest:nope", cls=E.PathNotFound)
    pit_fails(repo, "ls", "s@latest:src/f/below-a-file", cls=E.PathNotFound)
    pit_fails(repo, "cat", "s@latest:src/d", cls=E.PathNotFound)  # a directory is not a file
    pit_fails(repo, "restore", "s@latest:src/zzz", "--target", tmp_path / "out", cls=E.PathNotFound)


@pytest.mark.parametrize("path", ["../etc/passwd", "src/../../x", "src/d/../..", ".."])
def test_dotdot_in_path(world, path):
    repo, snap, tmp_path = world
    pit_fails(repo, "cat", f"{snap.hex}:{path}", cls=E.UnsafePath)
    pit_fails(repo, "ls", f"s@latest:{path}", cls=E.UnsafePath)
    pit_fails(repo, "restore", f"s@latest:{path}", "--target", tmp_path / "out", cls=E.UnsafePath)


def test_source_missing(world):
    repo, _, tmp_path = world
    pit_fails(repo, "snapshot", "--set", "s", tmp_path / "src", tmp_path / "not-there", cls=E.SourceMissing)
    assert len(json.loads(run_pit(repo, "snapshots", "--json").stdout)) == 1


def test_invalid_arguments(world):
    repo, _, tmp_path = world
    pit_fails(repo, "snapshot", "--set", "bad name!", tmp_path / "src", cls=E.InvalidArgument)
    pit_fails(repo, "snapshot", "--set", "s", "--changes", "-", tmp_path / "src", cls=E.InvalidArgument,
              input=b"/somewhere/else/entirely\n")
    pit_fails(tmp_path / "new", "init", "--avg-chunk-size", "3000", cls=E.InvalidArgument)


# ------------------------------------------------------------------ lock
def test_repository_locked_by_a_writer(world):
    repo, snap, tmp_path = world
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom store.repository import Repository\n"
         "w = Repository(sys.argv[1]).writer()\nprint('locked', flush=True)\nsys.stdin.read()\n", repo],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=pit_env(), cwd=ROOT)
    try:
        assert holder.stdout.readline() == b"locked\n"
        err = pit_fails(repo, "snapshot", "--lock-wait", "0.2", "--set", "s", tmp_path / "src",
                        cls=E.RepositoryLocked, timeout=10)
        assert f"pid {holder.pid}" in err
        # readers do not wait for the writer
        assert len(json.loads(run_pit(repo, "snapshots", "--json").stdout)) == 1
        assert run_pit(repo, "cat", f"{snap.hex}:src/f").stdout == b"file"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    run_pit(repo, "snapshot", "--lock-wait", "5", "--set", "s", tmp_path / "src")


# -------------------------------------------------------------- damage
def _chunk_of(repo, snap, path):
    with opened(repo, readonly=True) as r, r.reading() as txn:
        reader = ObjectReader(r, txn)
        cid = reader.chunk_list(reader.lookup(snap.root, path)).ids[3]
        return r.blob_entry(txn, cid)


def test_integrity_error(world):
    repo, snap, tmp_path = world
    e = _chunk_of(repo, snap, "src/big")
    pack = os.path.join(repo, "packs", P.pack_name(e.pack).split(".")[0][-2:], P.pack_name(e.pack))
    with open(pack, "r+b") as f:
        f.seek(e.offset + P.FRAME_HEADER.size + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    pit_fails(repo, "cat", "s@latest:src/big", cls=E.IntegrityError, stdout_empty=False)  # cat streams
    # restore goes on past damage and exits 3 naming it (tests/test_restore_damage.py); --fail-fast stops
    pit_fails(repo, "restore", "s@latest", "--target", tmp_path / "out", "--fail-fast", cls=E.IntegrityError)
    assert run_pit(repo, "cat", "s@latest:src/f").stdout == b"file"  # undamaged blobs still read


def test_blob_missing(world):
    repo, snap, tmp_path = world
    e = _chunk_of(repo, snap, "src/big")
    os.unlink(os.path.join(repo, "packs", P.pack_name(e.pack).split(".")[0][-2:], P.pack_name(e.pack)))
    pit_fails(repo, "cat", "s@latest:src/big", cls=E.BlobMissing)


def test_pin_refused(world):
    repo, snap, tmp_path = world
    snapshot(repo, "s", tmp_path / "src")
    run_pit(repo, "policy", "--set", "s", "--max", "2")
    run_pit(repo, "pin", "s@-1")
    pit_fails(repo, "pin", "s@latest", cls=E.PinRefused)


def test_chunker_unavailable(world, tmp_path):
    """With only a pure-Python (here: no) fastcdc importable, pit refuses loudly."""
    repo, _, _ = world
    fake = tmp_path / "fake" / "fastcdc"
    os.makedirs(fake)
    (fake / "__init__.py").write_text("# no compiled fastcdc_cy here\n")
    env = pit_env()
    env["PYTHONPATH"] = str(tmp_path / "fake") + os.pathsep + env["PYTHONPATH"]
    pit_fails(repo, "snapshot", "--set", "s", tmp_path / "src", cls=E.ChunkerUnavailable, env=env)
    pit_fails(tmp_path / "new", "init", cls=E.ChunkerUnavailable, env=env)


# ------------------------------------------------------- in-process too
def test_cli_runner_maps_errors_the_same(world):
    repo, snap, tmp_path = world
    for args, cls in ((["ls", "nosuch@latest"], E.SnapshotNotFound), (["cat", "s@latest:nope"], E.PathNotFound),
                      (["cat", "s@latest:../x"], E.UnsafePath)):
        res = cli(repo, *args, expect=cls.exit_code)
        assert res.stderr.startswith("pit: error: ") and res.stderr.count("\n") == 1
        assert res.stdout == ""
    res = cli(tmp_path / "absent", "snapshots", expect=E.RepositoryNotFound.exit_code)
    assert res.stderr.startswith("pit: error: no repository at ")


def test_names_with_newlines_keep_errors_on_one_line(world):
    """File names may contain newlines; the error must still be one line
    (StoreError.__str__ promises "a one-line message, always")."""
    repo, snap, tmp_path = world
    pit_fails(repo, "cat", "s@latest:src/no\nsuch", cls=E.PathNotFound)
    pit_fails(repo, "snapshot", "--set", "s", tmp_path / "gone\nmissing", cls=E.SourceMissing)
