"""A batch of paths on the wire: OFFER/NEED, CHUNKS, OPS and CHANGES frames, acknowledged.

`BatchSender.send_paths` reads the current state of each path from the
master's tree (a sender's queue holds paths, never data). A file travels as
its chunk list *relative to the previous version* the master knew (`base` +
keep/new ranges, `chunklist.delta_ops`), and only the chunk ids in new
ranges are offered; the replica answers which it lacks (NEED) and gets them
in CHUNKS frames. If the replica's entry is not that base, it asks for the
full list (`retry`). A range written in place while it is sent goes out
under its new id; a file that can no longer be read whole is left out and
marked dirty for the next round.

Frames stay below `protocol.MAX_FRAME`: changes are grouped into CHANGES
frames by their estimated size (`change_bytes`), and a chunk list too big
for one frame goes ahead in OPS frames (`split_ops`).
"""
from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from concurrent.futures.process import BrokenProcessPool

from store.errors import StoreError
from store.trees import FILE, SYMLINK

from ..errors import ProtocolError
from . import protocol
from .chunklist import Chunks, content_id, delta_ops
from .readers import RANGE_TASK_BYTES, Cutter, submit, worker_ranges
from .tree import DNode, FNode

log = logging.getLogger("pit.master")

# Every frame is sized from protocol.MAX_FRAME (16 MiB), with room to spare for msgpack overhead.
CHUNKS_FRAME = min(4 * 1024 * 1024, protocol.MAX_FRAME // 4)  # chunk payload bytes per CHUNKS frame
OFFER_IDS = min(8192, protocol.MAX_FRAME // 80)                  # ids per OFFER (and so per NEED)
CHANGES_BYTES = protocol.MAX_FRAME // 2                          # estimated bytes per CHANGES / OPS frame
REF_BYTES = 48  # an [id, length] pair as msgpack is 38-40 bytes; rounded up
READ_HERE_UP_TO = 8 * 1024 * 1024  # chunk bytes a batch reads on the sending thread; more goes to the readers
AHEAD_BYTES = 8 * 1024 * 1024  # payload bytes sent ahead of their files' changes at a time
AWAIT_MARGIN = 5.0  # seconds past settle_max a point waits for a path left out as changed while sent
WINDOW = 2  # CHANGES frames not yet acknowledged: the replica commits one while the next is received
BATCH_PATHS = 512  # paths per batch (a sender's queue is sent in batches of at most this many)


def change_bytes(c: dict) -> int:
    """An upper estimate of one change's msgpack size."""
    n = len(c["p"]) + 64 + len(c.get("x") or b"")
    for op in c.get("ops", ()):
        n += 16 if op[0] == 0 else 8 + REF_BYTES * len(op[1])
    return n


def split_ops(ops: list, budget: int) -> list[list]:
    """Cut a file's ops into pieces of at most `budget` estimated bytes (a new-range op is cut
    between chunk references); concatenated, the pieces are the same ops."""
    per = max(1, (budget - 64) // REF_BYTES)
    pieces: list[list] = [[]]
    room = budget
    for op in ops:
        if op[0] == 0:
            if room < 16:
                pieces.append([])
                room = budget
            pieces[-1].append(op)
            room -= 16
            continue
        refs = op[1]
        i = 0
        while i < len(refs):
            take = min(len(refs) - i, (room - 8) // REF_BYTES)
            if take <= 0:
                pieces.append([])
                room = budget
                continue
            take = min(take, per)
            pieces[-1].append([1, refs[i:i + take]])
            room -= 8 + REF_BYTES * take
            i += take
    return [p for p in pieces if p] or [[]]


def _send_chunks(conn: protocol.Conn, chunks) -> None:
    """Send [id, flags, raw length, payload] items as CHUNKS frames of up to CHUNKS_FRAME bytes."""
    buf, size = [], 0
    for c in chunks:
        if buf and size + len(c[3]) + 64 > CHUNKS_FRAME:
            conn.send({"t": "chunks", "chunks": buf})
            buf, size = [], 0
        buf.append(c)
        size += len(c[3]) + 64
    if buf:
        conn.send({"t": "chunks", "chunks": buf})


class BatchSender:
    """Sends batches of one set's paths to one replica, numbering and counting them (for the sender's status)."""

    def __init__(self, ms, replica: str) -> None:
        self.ms = ms
        self.replica = replica
        self.seq = 0
        self.acked = 0
        self.held = 0
        self.ops_frames = 0  # OPS frames sent: parts of chunk lists too big for one frame
        self.cutter = Cutter()  # zstd context of this sender's own reads
        # paths left out of a batch as changed while sent -> until when a point waits for their next version
        self.awaiting: dict[bytes, float] = {}
        self.unacked: deque[tuple[int, bool]] = deque()  # (seq, sent in full) of CHANGES frames not yet acked
        self.retry: list[bytes] = []  # paths the replica could not apply against their base: sent again in full

    def _offer_and_send(self, conn: protocol.Conn, ids: list[bytes], wanted: dict, stale: set,
                        fixed: dict | None) -> None:
        """OFFER ids, send the chunks the replica NEEDs. A range that changed since it was chunked
        (a file written in place while it is sent, like a database's log) is read as it is now and
        noted in `fixed` (path -> {offset: (new id, payload, length)}) to go out under its new id, so a point
        never leaves such a file out; a range that can no longer be read whole makes its path stale."""
        ms = self.ms
        for i in range(0, len(ids), OFFER_IDS):
            offered = ids[i:i + OFFER_IDS]
            conn.send({"t": "offer", "ids": offered})
            need = self._recv(conn, "need")["ids"]
            if len(need) < len(offered):  # the replica has the others: no sender will take their payloads
                needed = set(need)
                ms.payloads.forget([cid for cid in offered if cid not in needed])

            def readable():
                for cid, where, got in self._payloads(need, wanted):
                    if got is not None:
                        yield [cid, got[0], where[2], got[1]]
                        continue
                    now = self.cutter.read_any(*where) if fixed is not None else None
                    if now is None:
                        stale.add(where[0])
                    else:
                        fixed.setdefault(where[0], {})[where[1]] = (*now, where[2])

            _send_chunks(conn, readable())

    def send_ahead(self, conn: protocol.Conn) -> bool:
        """With nothing queued, send the payloads the scan made for files it has not finished (a big
        file being read): offered and sent now, spooled by the replica until their file's CHANGES,
        whose OFFER then finds them there. A big file's bytes go out while it is read, not after its
        end, and are never read again. -> whether anything was offered."""
        got = self.ms.payloads.take_ahead(AHEAD_BYTES, OFFER_IDS)
        if not got:
            return False
        conn.send({"t": "offer", "ids": [cid for cid, _, _ in got]})
        need = set(self._recv(conn, "need")["ids"])
        _send_chunks(conn, ([cid, flags, n, payload] for cid, (flags, payload), n in got if cid in need))
        return True

    def _payloads(self, need: list[bytes], wanted: dict):
        """(id, where, payload or None) of each needed chunk, in order. What the scan or an earlier send
        left in memory comes from there; the rest is read from the files, checked against its id and
        compressed: in the reader processes (readers.py), a few tasks ahead of this thread, when it is
        more than READ_HERE_UP_TO bytes (a catch-up, a big file), else here. None: the file no longer
        holds that chunk there."""
        ms = self.ms
        items: list[tuple[bytes, tuple, tuple | None]] = []
        missing = 0
        for cid in need:
            where = wanted.get(cid)
            if where is None:
                raise ProtocolError(f"{self.replica} asked for a chunk that was not offered")
            hit = ms.payloads.cached(cid)
            items.append((cid, where, hit))
            if hit is None:
                missing += where[2]
                ms.stats["chunks_read_again"] += 1
        readers = getattr(ms, "readers", None)
        if missing <= READ_HERE_UP_TO or readers is None:
            for cid, where, hit in items:
                yield cid, where, hit if hit is not None else ms.payloads.get(cid, where, self.cutter)
            return
        try:
            pool = readers.acquire()
        except StoreError as exc:
            log.warning("set %s -> %s: reading on the sending thread: %s", ms.name, self.replica, exc)
            for cid, where, hit in items:
                yield cid, where, hit if hit is not None else ms.payloads.get(cid, where, self.cutter)
            return
        tasks: list[list[int]] = []  # item indexes read by one worker task
        size = RANGE_TASK_BYTES
        for k, (_, where, hit) in enumerate(items):
            if hit is None:
                if size + where[2] > RANGE_TASK_BYTES:
                    tasks.append([])
                    size = 0
                tasks[-1].append(k)
                size += where[2]
        results: dict[int, tuple | None] = {}
        inflight: deque = deque()
        nxt = 0
        depth = 2 * readers.workers + 1
        broken = False
        try:
            for k, (cid, where, hit) in enumerate(items):
                if hit is not None:
                    yield cid, where, hit
                    continue
                while k not in results:
                    while not broken and nxt < len(tasks) and len(inflight) < depth:
                        reqs = [(items[j][1][0], items[j][1][1], items[j][1][2], items[j][0]) for j in tasks[nxt]]
                        try:
                            inflight.append((tasks[nxt], submit(pool, worker_ranges, reqs)))
                        except BrokenProcessPool:
                            broken = True
                            break
                        nxt += 1
                    if broken or not inflight:
                        results[k] = ms.payloads.get(cid, where, self.cutter)
                        break
                    idx, fut = inflight.popleft()
                    try:
                        got = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    for j, val in zip(idx, got):
                        results[j] = val
                        if val is not None:
                            ms.payloads.put(items[j][0], val)
                yield cid, where, results.pop(k)
        finally:
            for _, fut in inflight:
                fut.cancel()
            readers.release(pool, broken=broken)

    def _send_rewritten(self, conn: protocol.Conn, changes: list, fixed: dict, stale: set,
                        built: dict) -> list:
        """Files with ranges read anew: their chunk lists get the new ids at those offsets (the other
        ranges keep the ids they had when chunked), the new chunks are offered and sent, and the
        master's tree takes the list the replica will hold, so later deltas start from it. `built`: the
        tree node each change was made from."""
        ms = self.ms
        tree = ms.tree
        out = []
        for c in changes:
            path = tree.abs_path(c["p"]) if c.get("e") is not None and "ops" in c else None
            if path is None or path not in fixed or path in stale:
                out.append(c)
                continue
            with tree.lock:
                node = tree.lookup(c["p"])
                if node is not built.get(c["p"]) or not isinstance(node, FNode) or node.type != FILE:
                    # Re-chunked since the change was made (a WAL segment written while it was sent): its
                    # base and ranges belong to another version, and a delta mixing the two adds up to
                    # another size on the replica, which drops the connection (PostgreSQL harness, the
                    # replay of seed 3012: a point then waited 61 s). Left out; the scan re-queued it.
                    stale.add(path)
                    continue
                ids, lens, off, wanted = bytearray(), array("I"), 0, {}
                for cid, n in node.chunks:
                    new = fixed[path].get(off)
                    if new is not None and new[2] == n:  # the same range (the node was not re-chunked)
                        cid = new[0]
                        ms.payloads.put(cid, new[1])
                    ids += cid
                    lens.append(n)
                    wanted.setdefault(cid, (path, off, n))
                    off += n
                chunks = Chunks(bytes(ids), lens)
                base = c["base"] and node.prev
                ops = delta_ops(node.prev if base else None, chunks)
                repl = FNode(FILE, node.mode, node.uid, node.gid, node.mtime_ns, node.size, content_id(chunks),
                             chunks, node.skey, node.prev, node.prev_content)
                tree.set(c["p"], repl)
            new_ids = [cid for op in ops if op[0] == 1 for cid, _ in op[1]]
            self._offer_and_send(conn, list(dict.fromkeys(new_ids)), wanted, stale, None)
            if path not in stale:
                out.append(dict(c, ops=ops))
        return out

    def send_paths(self, conn: protocol.Conn, rels: list[bytes], full: set | None = None) -> None:
        """Send the current state of `rels` as one or more CHANGES frames (after their chunks), at most
        WINDOW of them unacknowledged (`drain` waits for the rest); a path the replica could not apply
        against its base is sent again in full, before the next batch."""
        if full is None:
            self._send_retries(conn)
        ms = self.ms
        tree = ms.tree
        mirror = ms.cfg.mode == "mirror"
        changes = []
        built: dict[bytes, FNode] = {}
        wanted: dict[bytes, tuple[bytes, int, int]] = {}
        with tree.lock:
            for rel in rels:
                node = tree.lookup(rel)
                if node is None:
                    if mirror:
                        changes.append({"p": rel, "e": None})
                    continue
                e = [node.type, node.mode, node.uid, node.gid, node.mtime_ns]
                if isinstance(node, DNode):
                    changes.append({"p": rel, "e": e})
                elif node.type == SYMLINK:
                    changes.append({"p": rel, "e": e, "x": node.content})
                else:
                    base = node.prev if (node.prev is not None and not (full and rel in full)) else None
                    ops = delta_ops(base, node.chunks)
                    changes.append({"p": rel, "e": e, "base": node.prev_content if base is not None else None,
                                    "ops": ops, "size": node.size})
                    built[rel] = node
                    path = tree.abs_path(rel)
                    off = 0
                    offsets = {}
                    for cid, n in node.chunks:
                        offsets.setdefault(cid, (path, off, n))
                        off += n
                    for op in ops:
                        if op[0] == 1:
                            for cid, n in op[1]:
                                wanted.setdefault(cid, offsets[cid])
        # Offer the ids of new ranges; send only what the replica lacks.
        stale: set[bytes] = set()
        fixed: dict[bytes, dict[int, tuple[bytes, tuple[int, bytes], int]]] = {}
        self._offer_and_send(conn, list(wanted), wanted, stale, fixed)
        if fixed:
            changes = self._send_rewritten(conn, changes, fixed, stale, built)
        if stale:
            # Changed since chunked: leave them out; the watcher (or the next scan) brings the new version,
            # and a consistent point waits for it (`awaiting`: the sender serves no point before).
            left = [c["p"] for c in changes if c["e"] is not None and tree.abs_path(c["p"]) in stale]
            changes = [c for c in changes if c["e"] is None or tree.abs_path(c["p"]) not in stale]
            until = time.monotonic() + ms.cfg.settle_max + AWAIT_MARGIN
            for rel in left:
                self.awaiting[rel] = until
            for p in stale:
                ms.mark(p, False)
        if not changes:
            return
        # Frames stay below the limit. Changes are grouped into CHANGES frames by their estimated size;
        # a file whose chunk list alone is too big for one frame (a seeded file of more than ~170,000
        # chunks, 2.6 GiB at 16 KiB) sends the leading part of its ops in OPS frames just before the
        # CHANGES frame that carries its last part: the replica joins them and commits all at once.
        parts: list[tuple[list, list]] = []  # ([OPS messages], [changes]) per CHANGES frame
        cur: list = []
        pre: list = []
        room = CHANGES_BYTES
        for c in changes:
            n = change_bytes(c)
            if n > CHANGES_BYTES:
                pieces = split_ops(c["ops"], CHANGES_BYTES - len(c["p"]) - 128)
                c = dict(c, ops=pieces[-1])
                n = change_bytes(c)
                if cur and n > room:
                    parts.append((pre, cur))
                    cur, pre, room = [], [], CHANGES_BYTES
                pre.extend({"t": "ops", "p": c["p"], "ops": piece} for piece in pieces[:-1])
            elif cur and n > room:
                parts.append((pre, cur))
                cur, pre, room = [], [], CHANGES_BYTES
            cur.append(c)
            room -= n
        parts.append((pre, cur))
        for pre, part in parts:
            for m in pre:
                conn.send(m)
                self.ops_frames += 1
            self.seq += 1
            conn.send({"t": "changes", "seq": self.seq, "changes": part})
            self.unacked.append((self.seq, full is not None))
            while len(self.unacked) > WINDOW:
                self._recv(conn, "ack")
        log.debug("set %s -> %s: %d changes, %d ids offered, %d bytes so far",
                  ms.name, self.replica, len(changes), len(wanted), conn.bytes_sent)

    # ------------------------------------------------------------- acknowledgements
    def reset(self) -> None:
        """A new session: what the last one left unacknowledged is the catch-up's to find."""
        self.unacked.clear()
        self.retry.clear()
        self.awaiting.clear()

    def awaited(self) -> bool:
        """Are paths left out of a batch (changed while sent) still to come? A consistent point served
        now would hold their older version: a database's log written on while the point's batch went
        out (under the point's hook) would be missing what was committed before the point. Bounded:
        past `settle_max` and a margin the point goes ahead."""
        now = time.monotonic()
        self.give_up([r for r, until in self.awaiting.items() if until <= now])
        return bool(self.awaiting)

    def give_up(self, rels: list[bytes]) -> None:
        """Stop waiting for these left-out paths: the next point goes ahead without their latest version."""
        for rel in rels:
            log.warning("set %s -> %s: %r did not settle: a point goes ahead without its latest version",
                        self.ms.name, self.replica, rel)
            del self.awaiting[rel]

    @property
    def pending(self) -> bool:
        return bool(self.unacked or self.retry)

    def _recv(self, conn: protocol.Conn, kind: str) -> dict:
        """The next `kind` message; acknowledgements that come first are taken on the way (the replica
        commits on a thread of its own and acknowledges whenever a commit is done)."""
        while True:
            msg = conn.recv((kind, "ack"))
            if msg["t"] == "ack":
                self._acked(msg)
                if kind != "ack":
                    continue
            return msg

    def _acked(self, ack: dict) -> None:
        if not self.unacked:
            raise ProtocolError(f"{self.replica} acknowledged batch {ack['seq']}, none was waiting")
        seq, full = self.unacked.popleft()
        if ack["seq"] != seq:
            raise ProtocolError(f"{self.replica} acknowledged batch {ack['seq']}, not {seq}")
        self.acked += 1
        self.held = ack["held"]
        if not full:  # a path sent in full that still cannot be applied waits for the next catch-up
            self.retry.extend(protocol.check_path(r) for r in ack["retry"])

    def drain(self, conn: protocol.Conn) -> None:
        """Wait until every CHANGES frame sent is acknowledged, and what the replica could not apply
        against its base is sent again in full (and acknowledged): before a point, a mark or a tree
        comparison, which must follow everything sent, and when the queue is empty."""
        while self.unacked or self.retry:
            while self.unacked:
                self._recv(conn, "ack")
            self._send_retries(conn)

    def _send_retries(self, conn: protocol.Conn) -> None:
        """Send again in full what the replica could not apply against its base."""
        if self.retry:
            retry, self.retry = list(dict.fromkeys(self.retry)), []
            self.send_paths(conn, retry, full=set(retry))
