"""The one filter model (store/filters.py): gitignore-style patterns, markers
(`--exclude-if-present`, `--exclude-caches`), `--one-file-system`; on `pit
snapshot` with real files and a real repository, bad input refused with one
line and nothing changed; a hypothesis comparison with a simple reference."""
from __future__ import annotations

import fnmatch
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from conftest import cli, list_snaps, make_tree, snapshot
from store.errors import InvalidArgument, SourceMissing
from store.filters import CACHEDIR_SIGNATURE, FilterRules, check_pattern, read_pattern_file
from store.objects import ObjectReader
from store.repository import Repository


def stored(repo_path, spec="s@latest") -> set[str]:
    from store.snapshots import resolve

    repo = Repository(str(repo_path), readonly=True)
    try:
        with repo.reading() as txn:
            snap = resolve(repo, txn, spec)
            r = ObjectReader(repo, txn)
            return {os.fsdecode(p) + ("/" if e.type == 2 else "") for p, e in r.walk(snap.root, b"")}
    finally:
        repo.close()


@pytest.fixture
def www(tmp_path):
    src = tmp_path / "www"
    make_tree(src, {"index.html": b"home", "a.tmp": b"t", "B.TMP": b"T", "keep.tmp": b"k",
                    "img": {"x.png": b"png", "y.tmp": b"t2"},
                    "node_modules": {"m": {"i.js": b"js"}},
                    "cache": {"CACHEDIR.TAG": CACHEDIR_SIGNATURE + b"\n# a cache\n", "c1": b"c"},
                    "fake": {"CACHEDIR.TAG": b"Signature: not the right one", "f1": b"f"},
                    "build": {".nobackup": b"", "o.o": b"o"},
                    "hdr": {"MARK": b"pit: skip me", "h": b"h"},
                    "hdr2": {"MARK": b"something else", "h": b"h"}})
    return src


def test_exclude_patterns_on_snapshot(repo_path, www):
    cli(repo_path, "snapshot", "--set", "s", "--exclude", "*.tmp", "-e", "!keep.tmp", "-e", "node_modules/", www)
    got = stored(repo_path)
    assert "www/a.tmp" not in got and "www/img/y.tmp" not in got
    assert "www/keep.tmp" in got and "www/B.TMP" in got  # case matters for --exclude
    assert not any(p.startswith("www/node_modules") for p in got)
    assert "www/index.html" in got and "www/img/x.png" in got
    snap = list_snaps(repo_path, "s")[-1]
    assert snap.stats["filter"] == {"exclude": ["*.tmp", "!keep.tmp", "node_modules/"]}
    assert snap.stats["excluded"] == 3  # a.tmp, img/y.tmp, node_modules


def test_iexclude_ignores_case(repo_path, www):
    cli(repo_path, "snapshot", "--set", "s", "--iexclude", "*.TMP", www)
    got = stored(repo_path)
    assert not any(p.lower().endswith(".tmp") for p in got), got


def test_anchored_and_absolute_patterns(repo_path, www):
    # /www/img is anchored at the snapshot's root; the absolute path of the source is rewritten to it
    cli(repo_path, "snapshot", "--set", "s", "-e", f"{www}/node_modules", "-e", "/www/img/", www)
    got = stored(repo_path)
    assert not any(p.startswith(("www/img", "www/node_modules")) for p in got)
    assert "www/cache/c1" in got


def test_exclude_file(repo_path, www, tmp_path):
    pf = tmp_path / "excludes"
    pf.write_bytes(b"# comments and blank lines are skipped\n\n*.tmp\r\ncache/\n")
    cli(repo_path, "snapshot", "--set", "s", "--exclude-file", pf, www)
    got = stored(repo_path)
    assert "www/a.tmp" not in got and "www/cache/" not in got and "www/keep.tmp" not in got
    assert read_pattern_file(str(pf)) == ["*.tmp", "cache/"]
    pf2 = tmp_path / "iexcludes"
    pf2.write_bytes(b"*.TMP\n")
    cli(repo_path, "snapshot", "--set", "s", "--iexclude-file", pf2, www)
    assert not any(p.lower().endswith(".tmp") for p in stored(repo_path))


def test_exclude_caches_follows_the_spec(repo_path, www, tmp_path):
    (www / "symlinked").mkdir()
    (www / "symlinked" / "CACHEDIR.TAG").symlink_to(www / "cache" / "CACHEDIR.TAG")  # not an ordinary file
    (www / "symlinked" / "s1").write_bytes(b"s")
    (www / "short").mkdir()
    (www / "short" / "CACHEDIR.TAG").write_bytes(CACHEDIR_SIGNATURE[:-1])  # one byte short
    cli(repo_path, "snapshot", "--set", "s", "--exclude-caches", www)
    got = stored(repo_path)
    assert not any(p.startswith("www/cache") for p in got)
    assert "www/fake/f1" in got and "www/symlinked/s1" in got and "www/short/CACHEDIR.TAG" in got


def test_exclude_if_present_with_and_without_header(repo_path, www):
    cli(repo_path, "snapshot", "--set", "s", "--exclude-if-present", ".nobackup",
        "--exclude-if-present", "MARK:pit: skip", www)
    got = stored(repo_path)
    assert not any(p.startswith(("www/build", "www/hdr/")) for p in got)
    assert "www/hdr2/h" in got


def test_one_file_system_keeps_the_mount_point_empty(repo_path, www):
    mnt = www / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (mnt / "other-fs-file").write_bytes(b"elsewhere")
        cli(repo_path, "snapshot", "--set", "s", "--one-file-system", www)
        got = stored(repo_path)
        assert "www/mnt/" in got and "www/mnt/other-fs-file" not in got
        cli(repo_path, "snapshot", "--set", "s", www)
        assert "www/mnt/other-fs-file" in stored(repo_path)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_non_utf8_names_and_patterns(repo_path, tmp_path):
    src = tmp_path / "src"
    make_tree(src, {b"\xff\xfe.tmp": b"x", b"caf\xe9": b"latin-1", "ok": b"ok"})
    pf = tmp_path / "ex"
    pf.write_bytes(b"caf\xe9\n")
    cli(repo_path, "snapshot", "--set", "s", "-e", "*.tmp", "--exclude-file", pf, src)
    assert stored(repo_path) == {"src/", "src/ok"}


def test_changed_filter_takes_effect_in_a_change_set_snapshot(repo_path, www):
    snapshot(repo_path, "s", www)
    assert "www/a.tmp" in stored(repo_path)
    # a change set naming one file: with another filter than its parent's, a full scan is made
    snap = snapshot(repo_path, "s", www, changes=[www / "index.html"], filters=FilterRules(exclude=("*.tmp",)))
    assert snap.stats["mode"] == "scan"
    assert "www/a.tmp" not in stored(repo_path)
    snap = snapshot(repo_path, "s", www, changes=[www / "img" / "y.tmp"], filters=FilterRules(exclude=("*.tmp",)))
    assert snap.stats["mode"] == "changes"
    assert "www/img/y.tmp" not in stored(repo_path)
    # the older snapshot keeps what it stored
    assert "www/a.tmp" in stored(repo_path, "s@-2")


@pytest.mark.parametrize("args, words", [
    (["-e", "../etc/passwd"], "contains `..`"),
    (["-e", "a/../../b"], "contains `..`"),
    (["-e", "/etc/shadow"], "under none of the source paths"),
    (["-e", "a\\"], "not a valid pattern"),
    (["-e", "!"], "is empty"),
    (["-e", "./cache"], "has a `.` component"),
    (["-e", "var/www/cache"], "can never match"),
    (["--exclude-if-present", "a/b"], "must be a file name"),
    (["--exclude-if-present", ".."], "must be a file name"),
    (["--exclude-file", "/nonexistent/excludes"], "cannot read pattern file"),
])
def test_bad_filters_are_one_line_and_change_nothing(repo_path, www, args, words):
    res = cli(repo_path, "snapshot", "--set", "s", *args, www, expect=None)
    assert res.exit_code in (InvalidArgument.exit_code, SourceMissing.exit_code), res.output
    err = res.stderr.strip()
    assert err.startswith("pit: error: ") and "\n" not in err and words in err, err
    assert list_snaps(repo_path) == []


def test_nul_and_line_breaks_in_patterns_are_refused():
    for bad in ("a\0b", "a\nb", "x\r"):
        with pytest.raises(InvalidArgument):
            check_pattern(bad)
    assert check_pattern("/srv/www/cache/", ["/srv/www"]) == "/www/cache/"
    assert check_pattern("!/srv/www/keep", ["/srv/www"]) == "!/www/keep"
    assert check_pattern("/www/cache", ["/srv/www"]) == "/www/cache"  # already in the stored form


# ------------------------------------------------------------------ a simple reference
NAMES = ["a", "b", "ab", "x.tmp", "y.TMP", "cache", "n"]
GLOBS = NAMES + ["*.tmp", "a*", "*b", "?", "*", "**"]


def ref_excluded(parts: list[str], is_dir: bool, pats: list[str]) -> bool:
    """gitignore by hand for this subset of patterns: a path is excluded when it, or a directory above
    it, is excluded; for one path the last matching pattern decides (a `!` one includes)."""
    def matches(pat: str, prefix: list[str], pdir: bool) -> bool:
        dir_only = pat.endswith("/")
        pat = pat.rstrip("/")
        if dir_only and not pdir:
            return False
        if pat.startswith("/"):
            segs = pat[1:].split("/")
            return len(segs) == len(prefix) and all(fnmatch.fnmatchcase(c, s) for c, s in zip(prefix, segs))
        return fnmatch.fnmatchcase(prefix[-1], pat.replace("**", "*"))

    for i in range(2, len(parts) + 1):  # parts[0] is the source: never excluded
        prefix, pdir = parts[:i], (i < len(parts) or is_dir)
        verdict = False
        for p in pats:
            neg = p.startswith("!")
            if matches(p[1:] if neg else p, prefix, pdir):
                verdict = not neg
        if verdict:
            return True
    return False


pattern_st = hs.one_of(
    hs.sampled_from(GLOBS),
    hs.sampled_from(GLOBS).map(lambda g: g + "/"),
    hs.sampled_from(GLOBS).map(lambda g: "!" + g),
    hs.lists(hs.sampled_from(NAMES), min_size=1, max_size=3).map(lambda p: "/src/" + "/".join(p)),
)
tree_st = hs.recursive(hs.just(b"f"), lambda kids: hs.dictionaries(hs.sampled_from(NAMES), kids, max_size=4),
                       max_leaves=12)


def _paths(tree, prefix=("src",)):
    for name, sub in tree.items():
        p = [*prefix, name]
        if isinstance(sub, dict):
            yield p, True
            yield from _paths(sub, p)
        else:
            yield p, False


@settings(max_examples=300, deadline=None)
@given(pats=hs.lists(pattern_st, max_size=5), tree=hs.dictionaries(hs.sampled_from(NAMES), tree_st, max_size=5))
def test_filter_agrees_with_the_reference(pats, tree):
    filt = FilterRules(exclude=tuple(pats)).compile()
    for parts, is_dir in _paths(tree):
        assert filt.excluded("/".join(parts), is_dir) == ref_excluded(parts, is_dir, pats), (parts, is_dir, pats)


def _build(root, tree):
    os.makedirs(root, exist_ok=True)
    for name, sub in tree.items():
        p = os.path.join(root, name)
        if isinstance(sub, dict):
            _build(p, sub)
        else:
            with open(p, "wb") as f:
                f.write(name.encode())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pats=hs.lists(pattern_st, max_size=4), tree=hs.dictionaries(hs.sampled_from(NAMES), tree_st, max_size=4))
def test_snapshot_walk_agrees_with_the_reference(tmp_path_factory, pats, tree):
    """What a real snapshot stores is exactly what the reference keeps."""
    from conftest import init_repo

    base = tmp_path_factory.mktemp("walk")
    src = base / "src"
    _build(str(src), tree)
    repo = init_repo(base / "repo")
    snapshot(repo, "s", src, filters=FilterRules(exclude=tuple(pats)))
    want = {"src/"} | {"/".join(p) + ("/" if d else "") for p, d in _paths(tree)
                       if not ref_excluded(p, d, pats)}
    assert stored(repo) == want
