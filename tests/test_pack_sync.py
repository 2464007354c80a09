"""Sealed packs are made durable on a thread of the writer's own (Writer._sync_later): the fsync of a
32 MiB pack no longer stalls the snapshot's busiest thread. The index still names no pack before it is
durable: the commit waits for every one, and a pack that cannot be synced fails the commit, which
commits nothing and leaves no new pack behind."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from conftest import init_repo, list_snaps, make_tree, opened, rand_bytes, restore, run_pit, snapshot, tree_digest
from store import repository
from store.backend import LocalBackend


def _packs(repo) -> set[str]:
    with opened(repo) as r:
        return set(r.backend.list())


def test_every_sealed_pack_is_synced_before_the_commit_returns(tmp_path, monkeypatch):
    repo = init_repo(tmp_path / "repo", pack_size=256 * 1024)  # a 3 MB snapshot seals about a dozen
    src = tmp_path / "src"
    make_tree(src, {f"f{i}.bin": rand_bytes(300_000, f"sync{i}") for i in range(10)})
    started, finished = [], []
    real = repository.sync_and_close

    def slow_sync(fd: int) -> None:
        started.append(threading.current_thread().name)
        time.sleep(0.05)  # a slow disk: a commit that did not wait would return before these finish
        real(fd)
        finished.append(fd)

    monkeypatch.setattr(repository, "sync_and_close", slow_sync)
    at_commit = []
    real_before = LocalBackend.before_commit
    monkeypatch.setattr(LocalBackend, "before_commit",  # called just before the index commit
                        lambda self: at_commit.append((len(started), len(finished))) or real_before(self))
    s = snapshot(repo, "s", src)
    assert len(started) >= 5 and at_commit[-1] == (len(started), len(started))
    assert all(name.startswith("pit-packsync") for name in started)  # not the writing thread
    restore(repo, s.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert run_pit(repo, "verify", "--deep").returncode == 0


def test_a_pack_that_cannot_be_synced_fails_the_commit_and_leaves_nothing(tmp_path, monkeypatch):
    repo = init_repo(tmp_path / "repo", pack_size=256 * 1024)
    src = tmp_path / "src"
    make_tree(src, {"first.txt": b"first\n"})
    first = snapshot(repo, "s", src)
    before = _packs(repo)
    make_tree(src, {f"f{i}.bin": rand_bytes(300_000, f"eio{i}") for i in range(10)})
    calls = []

    def failing(fd: int) -> None:
        calls.append(fd)
        os.close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(repository, "sync_and_close", failing)
    with pytest.raises(OSError, match="Input/output error"):
        snapshot(repo, "s", src)
    assert calls
    assert [x.hex for x in list_snaps(repo, "s")] == [first.hex]
    assert _packs(repo) <= before  # the session's packs are gone again (the open one cut back)
    monkeypatch.undo()
    assert run_pit(repo, "verify", "--deep").returncode == 0
    s2 = snapshot(repo, "s", src)
    restore(repo, s2.hex, tmp_path / "out")
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
