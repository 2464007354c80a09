"""A replication set's filter (store/filters.py through SetConfig): the master's scanner never
puts an excluded path in the set's tree, a changed filter takes a replicated path out of the tree
at the next scan (a deletion the replicas follow in mirror mode), the watcher drops events for
excluded paths, templates fill in their defaults, and bad patterns are named by their key."""
from __future__ import annotations

import os
import time

import pytest

from conftest import make_tree
from replicator.errors import ConfigError
from replicator.stream.scan import Scanner
from replicator.stream.tree import Tree
from replicator.stream.watcher import Watcher
from store.filters import CACHEDIR_SIGNATURE
from test_repl_helpers import cluster, set_config  # noqa: F401  (cluster: the fixture)


def scanner(src, **filt):
    cfg = set_config({"paths": [str(src)], "settle": 0, **filt}, "web")
    tree = Tree([os.fsencode(str(src))])
    stats = {"files_read": 0, "bytes_read": 0, "changes": 0, "unchanged": 0, "scans": 0}
    alerts: list[str] = []
    return Scanner(tree, cfg, stats, alerts.append, lambda rels: None), tree


def paths_in(tree, rel=b"www") -> set[str]:
    from replicator.stream.tree import DNode

    out = set()
    node = tree.lookup(rel)
    for name, child in (node.children.items() if isinstance(node, DNode) else []):
        p = rel + b"/" + name
        out.add(os.fsdecode(p))
        out |= paths_in(tree, p)
    return out


@pytest.fixture
def www(tmp_path):
    src = tmp_path / "www"
    make_tree(src, {"index.html": b"home", "a.tmp": b"t", "img": {"x.png": b"png"},
                    "cache": {"CACHEDIR.TAG": CACHEDIR_SIGNATURE, "c": b"c"},
                    "up": {".nosync": b"", "u": b"u"}}, mtime=None)
    old = time.time() - 60
    for dp, dn, fn in os.walk(src):
        for n in fn:
            os.utime(os.path.join(dp, n), (old, old))
    return src


def test_scanner_leaves_excluded_paths_out(www):
    sc, tree = scanner(www, exclude=["*.tmp"], exclude_caches=True, exclude_if_present=[".nosync"])
    sc.full_scan()
    assert paths_in(tree) == {"www/index.html", "www/img", "www/img/x.png"}
    assert sc.stats["files_read"] == 2  # nothing excluded was read


def test_a_changed_filter_takes_replicated_paths_out(www):
    sc, tree = scanner(www)
    sc.full_scan()
    assert "www/a.tmp" in paths_in(tree) and "www/cache/c" in paths_in(tree)
    # the agent restarts the set's master with the new configuration over the same tree (files cache)
    sc2 = Scanner(tree, set_config({"paths": [str(www)], "settle": 0, "exclude": ["*.tmp", "cache/"]}, "web"),
                  sc.stats, lambda m: None, lambda rels: None)
    changed, _ = sc2.full_scan()
    assert {b"www/a.tmp", b"www/cache"} <= set(changed)  # removed from the tree: the replicas follow (mirror)
    assert "www/a.tmp" not in paths_in(tree) and "www/cache" not in paths_in(tree)
    # an event for an excluded path changes nothing
    (www / "b.tmp").write_bytes(b"new")
    changed, _ = sc2.refresh({os.fsencode(str(www / "b.tmp")): False})
    assert changed == [] and "www/b.tmp" not in paths_in(tree)


def test_ignores_answers_for_ancestors(www):
    sc, _ = scanner(www, exclude=["img/"], exclude_caches=True)
    b = lambda p: os.fsencode(str(p))  # noqa: E731
    assert sc.ignores(b(www / "img" / "x.png"))
    assert sc.ignores(b(www / "img" / "new" / "deep.txt"))
    assert sc.ignores(b(www / "cache" / "c"))          # under a tagged cache directory
    assert not sc.ignores(b(www / "index.html"))
    assert not sc.ignores(b(www))                      # a source itself: never
    assert not sc.ignores(b"/elsewhere/x")             # not ours to judge


class _Recorder:
    """What the watcher needs of a MasterSet: its sources, scanner, and where marks go."""

    def __init__(self, sc, src):
        self.name, self.sources, self.scanner = "web", [os.fsencode(str(src))], sc
        self.marked: list[bytes] = []

    def mark(self, p, recurse):
        self.marked.append(p)

    def alert(self, msg):
        raise AssertionError(msg)


def test_watcher_drops_events_for_excluded_paths(www):
    sc, _ = scanner(www, exclude=["*.tmp", "img/"])
    ms = _Recorder(sc, www)
    w = Watcher()
    w.watch(ms)
    try:
        time.sleep(0.3)
        (www / "junk.tmp").write_bytes(b"x")
        (www / "img" / "y.png").write_bytes(b"y")
        (www / "kept.txt").write_bytes(b"k")
        deadline = time.time() + 10
        while time.time() < deadline and not any(p.endswith(b"kept.txt") for p in ms.marked):
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        w.stop()
    assert any(p.endswith(b"kept.txt") for p in ms.marked)
    assert not [p for p in ms.marked if p.endswith(b".tmp") or b"/img/" in p], ms.marked


@pytest.mark.parametrize("key, value, words", [
    ("exclude", ["../x"], "`sets.web.exclude[0]`"),
    ("exclude", ["/etc/passwd"], "under none of the source paths"),
    ("exclude", "*.tmp", "must be a list of patterns"),
    ("iexclude", ["a\0b"], "NUL"),
    ("exclude_if_present", ["a/b"], "must be a file name"),
    ("exclude_caches", "yes", "must be true or false"),
])
def test_bad_set_filters_name_their_key(tmp_path, key, value, words):
    with pytest.raises(ConfigError) as exc:
        set_config({"paths": [str(tmp_path)], key: value}, "web")
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_filter_keys_stay_off_the_wire_when_unset(tmp_path):
    plain = set_config({"paths": [str(tmp_path)]}, "web").to_wire()
    assert not {"exclude", "iexclude", "exclude_if_present", "exclude_caches", "one_file_system"} & set(plain)
    wired = set_config({"paths": [str(tmp_path)], "exclude": ["*.tmp"], "one_file_system": True}, "web").to_wire()
    assert wired["exclude"] == ["*.tmp"] and wired["one_file_system"] is True


def test_postgresql_template_excludes_what_pg_basebackup_leaves_out(tmp_path):
    from replicator.apps.templates import build_set

    data = str(tmp_path / "15" / "main")
    t = build_set("postgresql", "db", [data], ["r1"], "m")
    assert f"{data}/postmaster.pid" in t["exclude"] and f"{data}/pg_stat_tmp/*" in t["exclude"]
    cfg = set_config({"name": "db", **t})
    filt = cfg.filter_rules().compile(cfg.paths)
    assert filt.excluded("main/postmaster.pid", False) and filt.excluded("main/pg_stat_tmp/x", False)
    assert not filt.excluded("main/pg_stat_tmp", True)  # the directory stays: the server needs it
    assert not filt.excluded("main/base/1/1234", False)


def test_a_set_filter_end_to_end(cluster):
    """Excluded paths never reach a replica; excluding more later deletes them from a mirror's head at
    the next point, while the snapshots already taken keep them."""
    from test_repl_helpers import read_tree, replica_head, replica_snapshots, wait_for, write

    c = cluster(replicas=1)
    c.sets["web"]["exclude"] = ["*.tmp", "node_modules/"]
    c.sets["web"]["exclude_caches"] = True
    write(f"{c.src}/index.html", b"home")
    write(f"{c.src}/a.tmp", b"temp")
    write(f"{c.src}/node_modules/m/i.js", b"js")
    write(f"{c.src}/cache/CACHEDIR.TAG", CACHEDIR_SIGNATURE)
    write(f"{c.src}/cache/c", b"c")
    write(f"{c.src}/old/o.txt", b"old")
    c.start()
    r = c.replicas[0]
    name = os.path.basename(c.src)

    def want(*excluded):
        return {k: v for k, v in read_tree(c.src).items()
                if not any(k == f"{name}/{x}" or k.startswith(f"{name}/{x}/") for x in excluded)}

    kept_out = ("a.tmp", "node_modules", "cache")
    wait_for(lambda: replica_head(r.repo, "web") == want(*kept_out), 60, "seeding without the excluded")
    write(f"{c.src}/b.tmp", b"never sent")
    write(f"{c.src}/new.txt", b"sent")
    wait_for(lambda: replica_head(r.repo, "web") == want(*kept_out, "b.tmp"), 30, "a change, not the .tmp")
    c.primary.ctl("point", "--set", "web")
    # the filter grows: old/ leaves the set, and the mirror's head, at the next point
    c.sets["web"]["exclude"] = ["*.tmp", "node_modules/", "old/"]
    c.write_sets()
    wait_for(lambda: replica_head(r.repo, "web") == want(*kept_out, "b.tmp", "old"), 60, "old/ excluded")
    c.primary.ctl("point", "--set", "web")
    snaps = replica_snapshots(r.repo, "web")
    assert any(f"{name}/old/o.txt" in tree for _, tree in snaps[:-1])   # taken before: kept
    assert f"{name}/old/o.txt" not in snaps[-1][1]


def test_absolute_excludes_follow_a_promoted_secondarys_live_paths(tmp_path):
    """A template writes absolute patterns under the primary's data directory; the configuration keeps
    them in the stored form, so the set means the same from a secondary's live path (same base name,
    elsewhere), as failover's effective sets give it (dataclasses.replace of `paths`)."""
    from dataclasses import replace

    primary = tmp_path / "primary" / "main"
    live = tmp_path / "r1-live" / "main"
    make_tree(live, {"PG_VERSION": b"15", "postmaster.pid": b"4242", "pg_stat_tmp": {"s": b"x"}}, mtime=None)
    old = time.time() - 60
    for dp, _dn, fn in os.walk(live):
        for n in fn:
            os.utime(os.path.join(dp, n), (old, old))
    cfg = set_config({"paths": [str(primary)], "settle": 0,
                      "exclude": [f"{primary}/postmaster.pid", f"{primary}/pg_stat_tmp/*"]}, "db")
    assert cfg.exclude == ("/main/postmaster.pid", "/main/pg_stat_tmp/*")
    promoted = replace(cfg, paths=(str(live),))
    alerts: list[str] = []
    tree = Tree([os.fsencode(str(live))])
    sc = Scanner(tree, promoted, {"files_read": 0, "bytes_read": 0, "changes": 0, "unchanged": 0, "scans": 0},
                 alerts.append, lambda rels: None)
    sc.full_scan()
    assert paths_in(tree, b"main") == {"main/PG_VERSION", "main/pg_stat_tmp"} and alerts == []
    # a pattern these paths cannot take (written for another base name) is left out with an alert, never
    # the whole set
    odd = replace(promoted, exclude=("/elsewhere/x", "*.tmp"))
    sc2 = Scanner(Tree([os.fsencode(str(live))]), odd, dict(sc.stats), alerts.append, lambda rels: None)
    assert sc2.filt.match("main/a.tmp", False) and alerts and "left out" in alerts[0]


def test_watcher_marks_a_moved_in_tree_once_and_ignores_reads(www, tmp_path):
    """A tree moved in is one mark (its walk finds the rest: watchdog's made-up events for each file
    inside would mean a second look at every one), and reading a file is no event at all (each file
    the scan and the senders read made two)."""
    sc, _ = scanner(www)
    ms = _Recorder(sc, www)
    stage = tmp_path / "stage"
    for i in range(50):
        (stage / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (stage / f"d{i % 5}" / f"f{i}").write_bytes(b"%d" % i)
    (www / "read-me.txt").write_bytes(b"r")
    w = Watcher()
    w.watch(ms)
    try:
        time.sleep(0.3)
        os.rename(stage, www / "moved")
        (www / "read-me.txt").read_bytes()
        (www / "after.txt").write_bytes(b"a")  # events arrive in order: once this is marked, so is the rest
        deadline = time.time() + 10
        while time.time() < deadline and not any(p.endswith(b"after.txt") for p in ms.marked):
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        w.stop()
    assert any(p.endswith(b"/moved") for p in ms.marked), ms.marked
    assert not [p for p in ms.marked if b"/moved/" in p or p.endswith(b"read-me.txt")], ms.marked
