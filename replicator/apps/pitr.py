"""Restoring a database set to any second (`pit restore SET --at TIME --target DIR`, issue 16).

`pit restore` (store/cli.py) restores the newest snapshot of the set taken at or before TIME, then hands
the target to the `pit.restore_at` entry points; this one rolls a PostgreSQL data directory forward:

- the WAL comes from the replica's repository: set `SET.wal` holds, per history, the newest copy of the
  WAL the replica received (apps/pgwal.py archives it every 30 s); the newest such snapshot holding the
  image's redo segment is restored beside the target;
- a private server (pgwal.replay) replays it with `recovery_target_time = TIME` and promotes: the data
  directory then holds exactly the transactions committed at or before TIME, and is stopped cleanly;
- the answer says which image, which WAL, and where recovery stopped ("recovery stopping before commit of
  transaction N, time T", or the last transaction replayed when TIME is past the end of the log).

A set without archived WAL is not a database set of ours: the plain snapshot restore stands.
"""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile

from store.errors import InvalidArgument
from store.objects import ObjectReader
from store.restore import Restorer
from store.snapshots import list_snapshots

from ..errors import WalReplayFailed
from .pgwal import SEGMENT, _redo_segment, pg_time, replay, wal_set
from .pgtools import pg_bindir
from .sqlitewal import copies_in


def find_data_dir(top: str, depth: int = 4) -> str | None:
    """The PostgreSQL data directory under `top` (PG_VERSION and global/pg_control), nearest first."""
    level = [top]
    for _ in range(depth + 1):
        nxt = []
        for d in sorted(level):
            if os.path.isfile(os.path.join(d, "PG_VERSION")) and os.path.isfile(os.path.join(d, "global",
                                                                                              "pg_control")):
                return d
            try:
                nxt += [os.path.join(d, n) for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))
                        and not os.path.islink(os.path.join(d, n))]
            except OSError:
                continue
        level = nxt
    return None


def roll_forward(repo, snap, target: str, at_ns: int, path: str) -> dict | None:
    """Bring the PostgreSQL data directory restored from `snap` into `target` forward to `at_ns`."""
    ws = wal_set(snap.set)
    with repo.reading() as txn:
        wsnaps = list_snapshots(repo, txn, ws)
    if not wsnaps:
        return None
    if path:
        raise InvalidArgument("a database is restored to a second whole: give the set, not SET:PATH, with --at")
    data = find_data_dir(target)
    if data is None and copies_in(target):
        return None  # a SQLite set's copies: apps/sqlitewal.py rolls them forward
    if data is None:
        raise InvalidArgument(f"the snapshot {snap.set}@{snap.name} restored into {target} holds no PostgreSQL "
                              "data directory to roll forward")
    version = open(os.path.join(data, "PG_VERSION")).read().strip()
    bindir = pg_bindir(version) or pg_bindir()
    if not bindir:
        raise WalReplayFailed(f"PostgreSQL {version} binaries are not installed on this node")
    redo = _redo_segment(bindir, data)
    if redo is None:
        raise WalReplayFailed("pg_controldata does not give the image's redo point")
    owner = pwd.getpwuid(os.stat(os.path.join(data, "PG_VERSION")).st_uid).pw_name if os.geteuid() == 0 \
        else pwd.getpwuid(os.geteuid()).pw_name
    if owner == "root":
        owner = "postgres"
    work = tempfile.mkdtemp(prefix="pit-pitr-")
    try:
        with repo.reading() as txn:
            r = ObjectReader(repo, txn)
            chosen = None
            for cand in reversed(wsnaps):
                (top,) = r.tree(cand.root)  # the received directory, named by the set
                names = {e.name.decode("utf-8", "replace") for e in r.tree(top.content)}
                if redo in names or redo + ".partial" in names:
                    chosen = cand
                    break
            if chosen is None:
                raise WalReplayFailed(f"no archived WAL of set {snap.set} holds {redo}, the redo point of "
                                      f"{snap.set}@{snap.name}: the log after that image was not received here")
            wal = os.path.join(work, "wal")
            os.mkdir(wal)
            for e in r.tree(top.content):
                n = e.name.decode("utf-8", "replace")
                if SEGMENT.match(n):
                    Restorer(r).restore(e, wal)
        at = pg_time(at_ns)
        res = replay({"os_user": owner, "superuser": owner, "bindir": bindir}, data, wal, target_time=at)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"database": data, "wal": f"{ws}@{chosen.name}", "target_time": at, **res}
