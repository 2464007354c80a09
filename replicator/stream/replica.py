"""The replica side: receive, verify, commit, acknowledge; make consistent points.

Nothing from the wire is trusted. Every message is validated whole before
anything is written: paths (no '..', no leading '/', no NUL), entry shapes,
and every chunk is decompressed (bounded by its declared length) and hashed;
a chunk whose BLAKE3 is not its id, or that was not asked for, closes the
connection. Received chunks wait in the set's spool file (spool.py: bounded
memory for big files, kept across a kill or a lost connection) until the
CHANGES that reference them arrive; then one short writer session stores
them and moves the set's head (`store.apply.update_head`), and only after
that commit does the replica send ACK and drop them from the spool. A crash
before the commit loses nothing acknowledged; the master's catch-up offers
the rest again, and the replica NEEDs only what its spool does not hold.

Mirror mode applies deletions, archive mode never does. In mirror mode a
mass-delete breaker holds back a batch's deletions (and raises an alert)
when they would remove more than `delete_count` files of the newest
consistent point here, or more than `delete_percent` % of the set (once at
least `delete_min` files), or a whole source root. `pit release-deletes`
lets the next batch through.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time

import zstandard

from store import packs as P
from store.apply import Change, head_root, set_heads, snapshot_head, update_head
from store.crypto import PlainCodec
from store.errors import PathNotFound, StoreError
from store.keys import KeySource
from store.objects import ObjectReader
from store.repository import Repository
from store.retention import apply_retention
from store.snapshots import list_snapshots
from store.trees import DIR, FILE, SYMLINK, Entry

from ..errors import NotAuthorised, ProtocolError, ReplError
from ..settings import SetConfig
from . import protocol
from .merkle import TreeDigests
from .spool import MAX_CHUNK, Spool, verify_chunk  # noqa: F401  (verify_chunk: the check of a chunk off the wire)

log = logging.getLogger("pit.replica")

LISTING_BYTES = protocol.MAX_FRAME // 4  # estimated bytes of rows per LISTING frame
MAX_PENDING_REFS = 64_000_000  # chunk references of one file in OPS parts (1 TiB at 16 KiB)


def parse_change(c) -> dict:
    """Validate one change as it came off the wire (raises ProtocolError)."""
    if not isinstance(c, dict) or "p" not in c or "e" not in c:
        raise ProtocolError("a change must be a map with a path and an entry")
    if set(c) - {"p", "e", "x", "base", "ops", "size"}:
        raise ProtocolError("unknown fields in a change")
    protocol.check_path(c["p"])
    e = c["e"]
    if e is None:
        return c
    if not (isinstance(e, list) and len(e) == 5 and all(isinstance(v, int) and not isinstance(v, bool) for v in e)):
        raise ProtocolError("malformed entry")
    if e[0] not in (FILE, DIR, SYMLINK) or not 0 <= e[1] <= 0o7777:
        raise ProtocolError("malformed entry type or mode")
    if e[0] == SYMLINK and not (isinstance(c.get("x"), bytes) and 0 < len(c["x"]) <= protocol.MAX_PATH):
        raise ProtocolError("a symlink needs its target")
    if e[0] == FILE:
        base, ops, size = c.get("base"), c.get("ops"), c.get("size")
        if not (base is None or isinstance(base, bytes) and len(base) == 32) or not isinstance(ops, list) \
                or not isinstance(size, int) or size < 0:
            raise ProtocolError("malformed file change")
        check_ops(ops, base is not None)
    return c


def check_ops(ops, keep_allowed: bool) -> list:
    """Validate a chunk-list op list: [0, start, count] keeps a base range, [1, [[id, len], ...]] adds."""
    if not isinstance(ops, list):
        raise ProtocolError("malformed chunk-list ops")
    for op in ops:
        if not isinstance(op, list) or not op or op[0] not in (0, 1) or isinstance(op[0], bool):
            raise ProtocolError("malformed chunk-list op")
        if op[0] == 0:
            if not keep_allowed or len(op) != 3 or \
                    not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in op[1:]):
                raise ProtocolError("malformed keep op")
        else:
            if len(op) != 2 or not isinstance(op[1], list):
                raise ProtocolError("malformed new-chunks op")
            for pair in op[1]:
                if not (isinstance(pair, list) and len(pair) == 2) or not isinstance(pair[1], int) \
                        or isinstance(pair[1], bool) or not 0 < pair[1] <= MAX_CHUNK:
                    raise ProtocolError("malformed chunk reference")
                protocol.check_id(pair[0])
    return ops


class SetState:
    def __init__(self) -> None:
        self.last_change = 0.0
        self.last_point = time.monotonic()
        self.alerts: list[str] = []
        self.held = 0
        self.release = False
        self.applied = 0
        self.last_snapshot: str | None = None
        self.conns: set = set()


class Applier:
    """Commits one connection's CHANGES frames on a thread of its own, in order, and acknowledges each
    after its commit, while the connection's thread goes on receiving: the master sends the next
    batch's chunks (and this side verifies and spools them) while the last one is stored and synced,
    instead of the two sides taking turns (seeding a replica spent a third of its time so,
    docs/benchmarks.md). At most one frame waits behind the one being committed; anything that must
    see the head as acknowledged (a point, a mark, a listing) waits for `idle()` first. A frame that
    cannot be applied closes the connection, like it did on the receiving thread."""

    def __init__(self, side: "ReplicaSide", conn: protocol.Conn, set_name: str, cfg: SetConfig, spool: Spool) -> None:
        self.side, self.conn, self.set_name, self.cfg, self.spool = side, conn, set_name, cfg, spool
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"pit-apply-{set_name}")
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self.error is not None:
                    continue  # the connection is closing: the rest is not acknowledged
                seq, changes = item
                try:
                    applied, held, retry = self.side._apply(self.set_name, self.cfg, changes, self.spool)
                    self.conn.send({"t": "ack", "seq": seq, "applied": applied, "held": held, "retry": retry})
                except BaseException as exc:
                    self.error = exc
                    self.conn.close()
            finally:
                self.queue.task_done()

    def put(self, seq: int, changes: list[dict]) -> None:
        self.check()
        self.queue.put((seq, changes))

    def idle(self) -> None:
        """Wait until every frame handed over is committed and acknowledged (raises what failed)."""
        self.queue.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()


class ReplicaSide:
    """All sets this node receives, in one repository (chunks dedup across masters)."""

    def __init__(self, agent, repo_path: str, key_file: str | None = None) -> None:
        self.agent = agent
        # An encrypted replica repository is opened with the agent file's `key_file`: received chunks
        # (logical ids, zstd payloads) are sealed by this repository's own codec as they are stored.
        self.repo = Repository(repo_path, keys=KeySource(key_file=key_file) if key_file else None)
        self.spool_dir = os.path.join(self.repo.path, "tmp-replication")
        self.lock = threading.Lock()  # one writer and one cache user at a time in this process
        self.digests = TreeDigests()
        self.sets: dict[str, SetState] = {}
        self.stopped = False
        threading.Thread(target=self._points_loop, daemon=True, name="pit-points").start()

    def set_state(self, name: str) -> SetState:
        return self.sets.setdefault(name, SetState())

    def alert(self, name: str, msg: str) -> None:
        st = self.set_state(name)
        if msg not in st.alerts:
            st.alerts.append(msg)
            del st.alerts[:-20]
        log.warning("set %s: %s", name, msg)

    # ------------------------------------------------------------- a connection from a master
    def serve(self, conn: protocol.Conn, peer: str, fp: str, set_name: str | None) -> None:
        cfg = self.agent.sets().get(set_name or "")
        me = self.agent.state.node
        if cfg is None or me not in cfg.replicas:
            conn.fail("set", f"this node does not replicate set {set_name!r}")
            raise NotAuthorised(f"{peer} offered set {set_name!r}, which this node does not replicate")
        if cfg.master != peer:
            conn.fail("set", f"{peer} is not the master of set {set_name!r}")
            raise NotAuthorised(f"{peer} is not the master of set {set_name!r}")
        protocol.welcome(conn, me)
        st = self.set_state(set_name)
        for old in list(st.conns):
            # The master keeps one session per replica: an older one is a connection it has given up on
            # and this side has not yet seen dead. Closed now, it lets go of the set's spool (its commit
            # under way ends first) instead of keeping this session out of it for the spool's lock wait.
            log.info("set %s: %s connected again: closing its older connection", set_name, peer)
            old.close()
        st.conns.add(conn)
        dctx = zstandard.ZstdDecompressor()
        try:
            spool = self._open_spool(set_name, dctx)
        except BaseException:
            st.conns.discard(conn)
            raise
        requested: set[bytes] = set()
        pending_ops: dict[bytes, list] = {}  # leading parts of big chunk lists (OPS), joined at CHANGES
        pending_refs = 0
        last_auth = time.monotonic()
        applier = Applier(self, conn, set_name, cfg, spool)
        try:
            while True:
                try:
                    msg = conn.recv()
                except (ReplError, OSError):
                    applier.check()  # the applier closed the connection: its error, not the closed socket
                    raise
                if time.monotonic() - last_auth > 1.0:  # a removed node is cut off within a second
                    self.agent.authorise(peer, fp)
                    last_auth = time.monotonic()
                t = msg["t"]
                if t == "list":
                    applier.idle()
                    self._listing(conn, set_name, msg["paths"])
                elif t == "offer":
                    ids = [protocol.check_id(i) for i in msg["ids"]]
                    with self.lock, self.repo.reading() as txn:
                        db = self.repo.index.db["blobs"]
                        need = [i for i in dict.fromkeys(ids) if i not in spool and txn.get(i, db=db) is None]
                    requested.update(need)
                    conn.send({"t": "need", "ids": need})
                elif t == "chunks":
                    got = [verify_chunk(dctx, c) for c in msg["chunks"]]  # all checked before any is kept
                    for cid, *_ in got:
                        if cid not in requested:
                            raise ProtocolError(f"chunk {cid.hex()[:16]} was not asked for")
                    for cid, flags, raw_len, payload in got:
                        spool.add(cid, flags, raw_len, payload)
                        requested.discard(cid)
                elif t == "ops":
                    p = protocol.check_path(msg["p"])
                    ops = check_ops(msg["ops"], True)
                    pending_refs += sum(len(op[1]) if op[0] == 1 else 1 for op in ops)
                    if pending_refs > MAX_PENDING_REFS:
                        raise ProtocolError("chunk-list parts (OPS) beyond any file size")
                    pending_ops.setdefault(p, []).extend(ops)
                elif t == "changes":
                    raw = msg["changes"]
                    if pending_ops:
                        joined = []
                        for c in raw:
                            if isinstance(c, dict) and isinstance(c.get("ops"), list) \
                                    and isinstance(c.get("p"), bytes) and c["p"] in pending_ops:
                                c = dict(c, ops=pending_ops.pop(c["p"]) + c["ops"])
                            joined.append(c)
                        if pending_ops:
                            raise ProtocolError("chunk-list parts (OPS) for a path the next CHANGES does not carry")
                        raw = joined
                        pending_refs = 0
                    changes = [parse_change(c) for c in raw]
                    # Only what this frame stored leaves the spool: a batch's chunks come in one OFFER/CHUNKS
                    # round, and its changes may then span several CHANGES frames. Committed and
                    # acknowledged by the applier while this thread receives the next batch.
                    applier.put(msg["seq"], changes)
                    requested.clear()
                elif t == "point":
                    applier.idle()
                    if st.held:
                        # the head is not the master's state: a point now would be an image nobody had
                        # (and a failback would resurrect what the master deleted)
                        conn.fail("held", f"no point: {st.held} deletion(s) held by the mass-delete breaker "
                                  f"here; check, then `pit release-deletes --set {set_name}`")
                        return
                    name = self.point(set_name, cfg)
                    conn.send({"t": "pointed", "id": msg["id"], "snapshot": name})
                elif t == "mark":
                    applier.idle()
                    self.mark(set_name, msg["snapshot"], msg["ok"], msg["error"])
                    conn.send({"t": "marked"})
                else:
                    raise ProtocolError(f"unexpected {t!r} on a replication connection")
        finally:
            applier.stop()  # a commit under way ends first: it uses the spool
            st.conns.discard(conn)
            spool.close()

    def _open_spool(self, set_name: str, dctx) -> Spool:
        """The set's spool as an interrupted connection left it (spool.py), less what the repository holds.

        An encrypted repository gets a private spool, as before spools persisted: a record is a chunk in
        the clear, and nothing plain of a file may stay in the repository's directory (docs/format.md 12.6).
        """
        if not isinstance(self.repo.codec, PlainCodec):
            return Spool.private(self.spool_dir)
        spool = Spool.open(self.spool_dir, set_name, dctx)
        try:
            if len(spool):
                with self.lock, self.repo.reading() as txn:
                    db = self.repo.index.db["blobs"]
                    spool.discard([i for i in spool.ids() if txn.get(i, db=db) is not None])
        except BaseException:
            spool.close()
            raise
        return spool

    def _listing(self, conn: protocol.Conn, set_name: str, paths: list) -> None:
        paths = [protocol.check_dir_path(p) for p in paths]
        out, size = [], 0
        with self.lock, self.repo.reading() as txn:
            reader = ObjectReader(self.repo, txn)
            root = head_root(self.repo, txn, set_name)
            for p in paths:
                rows = []
                try:
                    e = reader.lookup(root, p) if root is not None else None
                except PathNotFound:
                    e = None
                if e is not None and e.type == DIR and e.content is not None:
                    for child in reader.tree(e.content):
                        rows.append([child.name, child.type, self.digests.entry(reader, child)])
                        size += 48 + len(child.name)
                        if size > LISTING_BYTES:  # a huge directory spans frames: the master merges rows by path
                            out.append([p, rows])
                            conn.send({"t": "listing", "dirs": out, "end": False})
                            out, rows, size = [], [], 0
                out.append([p, rows])
                size += 16 + len(p)
                if size > LISTING_BYTES:
                    conn.send({"t": "listing", "dirs": out, "end": False})
                    out, size = [], 0
        conn.send({"t": "listing", "dirs": out, "end": True})

    # ------------------------------------------------------------- commit
    def _apply(self, set_name: str, cfg: SetConfig, changes: list[dict], spool: Spool) -> tuple[int, int, list]:
        st = self.set_state(set_name)
        retry: list[bytes] = []
        held = 0
        with self.lock:
            with self.repo.writer(lock_wait=60) as w:
                reader = ObjectReader(self.repo, w.txn)
                root = head_root(self.repo, w.txn, set_name)
                out: list[Change] = []
                deletes: list[Change] = []
                stored: set[bytes] = set()

                def lookup(p: bytes):
                    if root is None:
                        return None
                    try:
                        return reader.lookup(root, p)
                    except (PathNotFound, StoreError):
                        return None

                for c in changes:
                    p, e = c["p"], c["e"]
                    if e is None:
                        deletes.append(Change(p.decode("utf-8", "surrogateescape"), None))
                        continue
                    name = p.rsplit(b"/", 1)[-1]
                    entry = Entry(name, e[0], e[1], e[2], e[3], e[4], 0)
                    chunks = None
                    if e[0] == SYMLINK:
                        entry.content, entry.size = c["x"], len(c["x"])
                    elif e[0] == FILE:
                        chunks = []
                        old = None
                        if c["base"] is not None:
                            cur = lookup(p)
                            if cur is None or cur.type != FILE or cur.content != c["base"]:
                                log.debug("set %s: %r base %s, have %s", set_name, p, c["base"].hex()[:12],
                                          cur.content.hex()[:12] if cur is not None and cur.content else cur)
                                retry.append(p)  # not the version the master diffed against
                                continue
                            old = reader.chunk_list(cur)
                        for op in c["ops"]:
                            if op[0] == 0:
                                s, n = op[1], op[2]
                                if s + n > len(old.ids):
                                    raise ProtocolError("keep op past the end of the base chunk list")
                                chunks.extend(zip(old.ids[s:s + n], old.lengths[s:s + n]))
                            else:
                                chunks.extend((cid, n) for cid, n in op[1])
                        if sum(n for _, n in chunks) != c["size"]:
                            raise ProtocolError(f"{p!r}: chunk lengths do not add up to the file size")
                        for cid, n in chunks:
                            if cid in stored:
                                continue
                            if cid in spool:
                                flags, payload, raw_len = spool.get(cid)
                                if raw_len != n:
                                    raise ProtocolError("chunk length differs from the one received")
                                if not w.has(cid):
                                    w.put_stored(P.CHUNK, cid, flags, payload, raw_len)
                                stored.add(cid)
                            elif not w.has(cid):
                                raise ProtocolError(f"chunk {cid.hex()[:16]} was neither sent nor present")
                    out.append(Change(p.decode("utf-8", "surrogateescape"), entry, chunks))
                if deletes and cfg.mode == "mirror":
                    held = self._breaker(set_name, cfg, st, reader, root, deletes)
                    if not held:
                        out.extend(deletes)
                elif deletes:
                    pass  # archive: nothing received is ever removed from the current view
                if out:
                    update_head(w, set_name, out)
        spool.discard(stored)  # committed: the repository holds them now (a compaction runs outside the lock)
        if out:
            st.last_change = time.monotonic()
            st.applied += len(out)
        if held:  # sticky until released: the held files stay in the head whatever later batches carry
            st.held = held
        return len(out), held, retry

    def _breaker(self, set_name, cfg, st: SetState, reader, root, deletes: list[Change]) -> int:
        """Number of deleted files held back (0: let them through).

        What counts is what the deletions take from the newest consistent point here (or from the head when
        there is none yet): files that arrived after it were never in an image, and deleting them loses
        nothing a restore or a failover could have offered. That is also exactly what a new term's first
        catch-up deletes on every replica: the old primary's writes after its last point, which the promotion
        rolled back (the failover harness, seed 1024: without this the breaker held them on the archive
        replica and on the node that had handed over, no point reached either, and the latter could never
        take over again)."""
        if st.release:
            st.release = False
            st.held = 0
            st.alerts = [a for a in st.alerts if "mass delete" not in a]
            return 0
        snaps = list_snapshots(self.repo, reader.txn, set_name)
        ref = snaps[-1].root if snaps else root
        n = 0
        whole_source = False
        for d in deletes:
            if "/" not in d.path:
                whole_source = True
            try:
                e = reader.lookup(ref, d.path) if ref else None
            except (PathNotFound, StoreError):
                e = None
            if e is None:
                continue
            n += e.extra.get("f", 0) if e.type == DIR else 1
        total = sum(e.extra.get("f", 0) if e.type == DIR else 1 for e in reader.tree(root)) if root else 0
        pct = 100.0 * n / total if total else 0.0
        if whole_source or n > cfg.delete_count or (n >= cfg.delete_min and pct > cfg.delete_percent):
            self.alert(set_name, f"mass delete held: {n} of {total} files ({pct:.0f} %) would be deleted"
                       f"{' including a whole source root' if whole_source else ''}; "
                       f"check the master, then `pit release-deletes --set {set_name}`")
            return max(n, 1)
        return 0

    # ------------------------------------------------------------- consistent points
    def point(self, set_name: str, cfg: SetConfig) -> str | None:
        """Make the head a snapshot now; returns the newest snapshot's name (None if there is none)."""
        st = self.set_state(set_name)
        from ..ops.metrics import observe

        with self.lock:
            with self.repo.writer(lock_wait=60) as w:
                t0 = time.monotonic()
                snap = snapshot_head(w, set_name, list(cfg.paths), cfg.master)
                if snap is not None:
                    t1 = time.monotonic()
                    observe("snapshot", t1 - t0, set=set_name)
                    apply_retention(w, set_name)  # drops beyond the cap: the prune of the oldest
                    observe("retention", time.monotonic() - t1, set=set_name)
            with self.repo.reading() as txn:
                snaps = list_snapshots(self.repo, txn, set_name)
        st.last_point = time.monotonic()
        st.last_snapshot = snaps[-1].name if snaps else None
        return st.last_snapshot

    def mark(self, set_name: str, snap_name: str, ok: bool, error: str) -> None:
        """The master's word on a point's hooks, kept on the snapshot (snapmeta `point`)."""
        from store.snapshots import resolve

        from ..apps.hooks import mark_point

        with self.lock:
            with self.repo.reading() as txn:
                try:
                    snap = resolve(self.repo, txn, f"{set_name}@{snap_name}")
                except Exception:
                    raise ProtocolError(f"mark: set {set_name!r} has no snapshot {snap_name!r}") from None
            mark_point(self.repo, snap.id, {"ok": ok, "error": error or None}, lock_wait=60)
        if not ok:
            self.alert(set_name, f"point {snap_name}: hooks failed ({error}); image selection skips it")

    def arm_release(self, set_name: str) -> None:
        """Let the next batch's deletions through the breaker (what they delete is kept elsewhere)."""
        self.set_state(set_name).release = True

    def release(self, set_name: str) -> None:
        st = self.set_state(set_name)
        st.release = True
        st.held = 0  # the catch-up on reconnection makes the head equal to the master's
        for c in list(st.conns):  # the master reconnects and its catch-up resends the deletions
            c.close()

    def _points_loop(self) -> None:
        while not self.stopped:
            time.sleep(0.25)
            try:
                sets = self.agent.sets()
                me = self.agent.state.node
                with self.lock, self.repo.reading() as txn:
                    heads = set_heads(self.repo, txn)
                now = time.monotonic()
                for name, cfg in sets.items():
                    if me not in cfg.replicas or name not in heads:
                        continue
                    st = self.set_state(name)
                    quiet = cfg.point_quiet and now - st.last_change >= cfg.point_quiet
                    every = cfg.point_every and now - st.last_point >= cfg.point_every * 60
                    if quiet or every:
                        self.point(name, cfg)
            except Exception:
                log.exception("consistent-point loop")

    def status(self) -> dict:
        out = {}
        with self.lock, self.repo.reading() as txn:
            heads = set_heads(self.repo, txn)
            for name, st in self.sets.items():
                snaps = list_snapshots(self.repo, txn, name)
                out[name] = {"role": "replica", "snapshots": len(snaps),
                             "latest": snaps[-1].name if snaps else None, "head_pending": name in heads,
                             "alerts": list(st.alerts), "held_deletes": st.held, "applied": st.applied,
                             "connected": bool(st.conns)}
        return out

    def close(self) -> None:
        self.stopped = True
        with self.lock:
            self.repo.close()
