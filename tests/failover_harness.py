"""A randomized fault harness for failover (issue 14), Jepsen-style, on 127.0.0.1.

Three real agents (primary, r1 the secondary station, r2 an archive replica) and a real etcd; the
application is the takeover hooks' web server over each node's live files, checked by the secondary over
HTTP. A client appends ids and counts one acknowledged only while its node holds the leader key and runs
the service, as an application behind the hooks would. A nemesis draws a schedule from a seed: configuration
pushes, SIGKILL of the archive replica or of the secondary's agent, and crashes of the primary (agent and
service) followed by its return and a planned failback. A checker then proves, from the nodes' fencing logs
and the files:

- at most one node served as primary at any moment (the service windows of different tokens never overlap);
- every acknowledged id is in the primary's live files at the end, except those a crashed primary
  acknowledged in the term the crash ended, after the last consistent point r1 got (reported as the RPO;
  an id written just before the kill can be counted acknowledged just after it: the client checks its
  token against etcd after the write, and the lease outlives the process);
- no id acknowledged by a later primary is ever missing (no rollback by a promotion);
- the cluster converges: the archive replica's head equals the primary's files after quiet.

Every run prints its seed; `run_schedule(seed, ...)` replays it.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from test_repl_helpers import pit, read_tree, replica_head, wait_for

OPS = ("push", "kill_archive", "kill_secondary_agent", "crash_primary")


@dataclass
class Ack:
    id: int
    node: str
    token: int
    time: float


@dataclass
class Outcome:
    seed: int
    ops: list[str] = field(default_factory=list)
    acked: int = 0
    lost_allowed: int = 0     # acknowledged after the last point before an unplanned crash (the RPO)
    rto: list[float] = field(default_factory=list)   # seconds from a crash to the secondary serving
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"seed {self.seed}: {len(self.ops)} ops ({', '.join(self.ops)}); {self.acked} acknowledged, "
                f"{self.lost_allowed} after the last point before a crash; RTO "
                + (", ".join(f"{x:.1f}" for x in self.rto) or "-") + " s; "
                + ("OK" if not self.problems else "PROBLEMS: " + "; ".join(self.problems)))


def _status(node) -> dict:
    r = node.ctl("status", "--local", check=False)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {}


def _fo(node) -> dict:
    return _status(node).get("failover", {})


def _caught_up(master, replica: str) -> bool:
    """The master's sender to `replica` is connected with nothing queued and no tree comparison pending
    (the client keeps writing: the trees are never equal at one instant)."""
    st = _status(master).get("sets", {}).get("web", {}).get("replicas", {}).get(replica, {})
    return bool(st.get("connected")) and not st.get("queued") and not st.get("catchup")


class Client:
    """Appends ids to whichever node holds the key and runs its service; an id is acknowledged once its
    file is durable and the node still held the same token after the write."""

    def __init__(self, c, etcd_client, key: str) -> None:
        self.c, self.etcd, self.key = c, etcd_client, key
        self.acks: list[Ack] = []
        self.next_id = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _holder(self):
        try:
            kv, _ = self.etcd.get(self.key)
        except Exception:
            return None
        return (kv.value.decode(), kv.mod_revision) if kv is not None else None

    def _live(self, node: str) -> str | None:
        if not os.path.exists(os.path.join(self.c.tmp, "hooks", node, "web.pid")):
            return None  # its service is not running: nothing would answer a client
        return {"primary": self.c.src, "r1": self.c.live}.get(node)

    def _run(self) -> None:
        while not self.stop.is_set():
            h = self._holder()
            live = self._live(h[0]) if h else None
            if live is not None:
                i = self.next_id
                path = os.path.join(live, "acks", f"{i:06d}")
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(b"%d" % i)
                        f.flush()
                        os.fsync(f.fileno())
                except OSError:
                    path = None
                if path and self._holder() == h and self._live(h[0]) == live:
                    self.acks.append(Ack(i, h[0], h[1], time.time()))
                    self.next_id += 1
            self.stop.wait(0.05)

    def __enter__(self) -> "Client":
        self.thread.start()
        return self

    def __exit__(self, *a) -> None:
        self.stop.set()
        self.thread.join(5)


def _windows(c, killed: dict[str, list[float]], end: float) -> list[tuple[float, float, str, int]]:
    """(start, end, node, token) of every term, from the fencing logs; a SIGKILLed holder's term ends at
    its kill."""
    out = []
    for n in c.nodes():
        try:
            with open(os.path.join(n.state, "fencing.log")) as f:
                events = [json.loads(x) for x in f]
        except FileNotFoundError:
            continue
        open_ = None
        for e in events:
            if e["event"] == "active":
                if open_ is not None:
                    out.append((open_["t"], _kill_after(killed, n.name, open_["t"], e["t"]), n.name,
                                open_["token"]))
                open_ = e
            elif e["event"] == "inactive" and open_ is not None:
                out.append((open_["t"], e["t"], n.name, open_["token"]))
                open_ = None
        if open_ is not None:
            out.append((open_["t"], _kill_after(killed, n.name, open_["t"], end), n.name, open_["token"]))
    return sorted(out)


def _kill_after(killed: dict[str, list[float]], node: str, start: float, default: float) -> float:
    later = [t for t in killed.get(node, []) if t >= start]
    return min(later) if later and min(later) < default else default


def run_schedule(c, seed: int, steps: int, log=print) -> Outcome:
    """Drive a started FailoverCluster `c` through `steps` random operations drawn from `seed`."""
    from replicator.failover.etcd import Etcd
    from replicator.stream.membership import NodeState, ca_fingerprint

    rng = random.Random(seed)
    out = Outcome(seed)
    p, r1, r2 = c.primary, c.replicas[0], c.replicas[1]
    key = f"/pit/{ca_fingerprint(NodeState(p.state))[:16]}/leader"
    etcd = Etcd([c.etcd], timeout=1.0)
    killed: dict[str, list[float]] = {}
    last_point = 0.0
    # (time of the last point r1 got before it, time of the crash, the fencing token of the term it ended)
    crashes: list[tuple[float, float, int]] = []
    with Client(c, etcd, key) as client:
        wait_for(lambda: client.acks, 30, "the first acknowledged write")
        for op in [rng.choice(OPS) for _ in range(steps)]:  # the schedule first: a seed names it
            out.ops.append(op)
            log(f"seed {seed}: {op}")
            if op == "push":
                c.failover["confirm"] = 3 if c.failover["confirm"] == 2 else 2
                c.write_sets()
            elif op == "kill_archive":
                r2.kill(signal.SIGKILL)
                time.sleep(rng.uniform(0.5, 2.0))
                r2.start()
            elif op == "kill_secondary_agent":
                r1.kill(signal.SIGKILL)
                time.sleep(rng.uniform(0.5, 2.0))
                r1.start()
            elif op == "crash_primary":
                asked = time.time()
                r = p.ctl("point", "--set", "web", check=False)
                made = [ln.split("\t")[0] for ln in r.stdout.splitlines() if "\t" in ln and "skipped" not in ln]
                if r.returncode == 0 and "r1" in made:
                    last_point = asked  # what was acknowledged before it asked is in r1's image
                time.sleep(rng.uniform(0.0, 1.5))  # writes after the point: within the RPO
                t_crash = time.time()
                term = int(_fo(p).get("token") or 0)
                p.kill(signal.SIGKILL)
                killed.setdefault("primary", []).append(t_crash)
                subprocess.run(c.hook("stop"), shell=True, check=True,
                               env=dict(os.environ, PIT_NODE="primary", PIT_ROLE="crashed"))
                crashes.append((last_point, t_crash, term))
                wait_for(lambda: _fo(r1).get("phase") == "active"
                         and os.path.exists(os.path.join(c.tmp, "hooks", "r1", "web.pid")), 90,
                         "r1 to take over")
                out.rto.append(time.time() - t_crash)
                time.sleep(rng.uniform(0.5, 3.0))
                p.write_config(f'cluster = "{c.cluster_file}"')
                p.start()
                wait_for(lambda: _fo(p).get("phase") == "fenced", 60, "the old primary fenced")
                wait_for(lambda: _caught_up(r1, "primary"), 90, "the old primary to catch up")
                pit("failback", "--config", p.config, "--json", check=True)
                wait_for(lambda: _fo(p).get("phase") == "active" and _fo(r1).get("leader") == "primary", 60,
                         "the failback")
            time.sleep(rng.uniform(0.5, 2.5))
        time.sleep(3 * c.failover["ttl"])  # quiet: a stale decision would act now
    end = time.time()

    # ---------------------------------------------------------------- the checker
    wins = _windows(c, killed, end)
    for a, b in zip(wins, wins[1:]):
        if a[2] != b[2] and b[0] < a[1] - 0.01:
            out.problems.append(f"{a[2]} (token {a[3]}) and {b[2]} (token {b[3]}) served at once "
                                f"({b[0] - a[1]:+.2f} s)")
    terms = [w for w in wins if w[2] == "primary"]
    if len(terms) != 1 + len(crashes):  # its first term and one per failback: a config push never drops it
        out.problems.append(f"the primary had {len(terms)} terms for {len(crashes)} crash(es)")
    final = _fo(p)
    if not final.get("holding"):
        out.problems.append(f"the primary does not hold the key at the end: {final.get('phase')}")
    present = set(os.listdir(os.path.join(c.src, "acks"))) if os.path.isdir(os.path.join(c.src, "acks")) else set()
    out.acked = len(client.acks)
    for ack in client.acks:
        if f"{ack.id:06d}" in present:
            continue
        # the crashed term's ids after the last point r1 got: an id written before the kill may be counted
        # acknowledged just after it (the client's token check against etcd comes after the write)
        allowed = any(ack.node == "primary" and ack.token == term and since <= ack.time for since, _, term in crashes)
        if allowed:
            out.lost_allowed += 1
        else:
            out.problems.append(f"id {ack.id} acknowledged by {ack.node} (token {ack.token}) is lost")
    try:
        wait_for(lambda: replica_head(r2.repo, "web") == read_tree(c.src), 60, "r2 to converge")
    except AssertionError as exc:
        out.problems.append(str(exc))
    log(out.line())
    return out
