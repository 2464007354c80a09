"""Retention: the 64-snapshot cap, keep-last/hourly/daily/weekly/monthly thinning,
pins (kept, counted against the cap, refused past it), `pit forget` and
`pit policy`.

`retention.decide` is unit-tested with synthetic snapshots at chosen times;
everything else runs against real repositories and the real `pit`.
"""
from __future__ import annotations

import calendar
import hashlib
import os
import random

import pytest

from maint_helpers import (
    assert_verify_clean, get_snapmeta, init_repo, pack_files, pit, pit_json, restore_digest, snap,
    snapshot_ids, source_digest, write_file,
)
from store.errors import InvalidArgument, PinRefused
from store.retention import DEFAULT_MAX, Policy, decide
from store.snapshots import Snapshot

# ------------------------------------------------------------------ decide()


def ts(y, mo, d, h=0, mi=0, s=0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1_000_000_000


def mk(times: list[int]) -> list[Snapshot]:
    out = []
    for i, t in enumerate(times):
        sid = hashlib.sha256(f"snap{i}".encode()).digest()
        out.append(Snapshot("s", f"n{i}", t, "host", ["/x"], b"\0" * 32, None, {}, sid))
    return out


def kept(decisions) -> list[int]:
    """Times (ns) of the kept snapshots, newest first."""
    return [d.snapshot.time_ns for d in decisions if d.keep]


def test_decide_no_rules_keeps_everything_up_to_cap():
    snaps = mk([ts(2024, 1, 1) + i * 60 * 10**9 for i in range(70)])
    random.Random(3).shuffle(snaps)  # any order in
    ds = decide(snaps, Policy(), set())
    assert [d.snapshot.time_ns for d in ds] == sorted((s.time_ns for s in snaps), reverse=True)  # newest first out
    assert DEFAULT_MAX == 64
    assert len(kept(ds)) == 64
    dropped = [d for d in ds if not d.keep]
    assert sorted(d.snapshot.time_ns for d in dropped) == sorted(s.time_ns for s in snaps)[:6]  # the 6 oldest
    for d in dropped:
        assert any("cap" in r for r in d.reasons), d.reasons


def test_decide_under_cap_drops_nothing():
    snaps = mk([ts(2024, 1, 1) + i * 10**9 for i in range(10)])
    assert all(d.keep for d in decide(snaps, Policy(max=10), set()))


def test_decide_keep_last():
    snaps = mk([ts(2024, 1, 1) + i * 10**9 for i in range(10)])
    ds = decide(snaps, Policy(keep_last=3), set())
    assert kept(ds) == [s.time_ns for s in snaps[::-1][:3]]
    assert all("last" in d.reasons for d in ds if d.keep)


def test_decide_keep_hourly():
    # every 20 minutes from 00:00 to 09:40: the newest of each hour is hh:40
    snaps = mk([ts(2024, 3, 10, h, m) for h in range(10) for m in (0, 20, 40)])
    ds = decide(snaps, Policy(keep_hourly=4), set())
    assert kept(ds) == [ts(2024, 3, 10, h, 40) for h in (9, 8, 7, 6)]


def test_decide_keep_daily_counts_only_days_with_snapshots():
    # two a day on days 1, 2, 5 and 9 (gaps: days without snapshots do not use up the rule)
    days = [1, 2, 5, 9]
    snaps = mk([ts(2024, 5, d, h) for d in days for h in (6, 18)])
    ds = decide(snaps, Policy(keep_daily=3), set())
    assert kept(ds) == [ts(2024, 5, d, 18) for d in (9, 5, 2)]


def test_decide_keep_weekly_uses_iso_weeks():
    # one snapshot a day through January 2024 (Jan 1 is a Monday; Sunday ends an ISO week)
    snaps = mk([ts(2024, 1, d, 12) for d in range(1, 32)])
    ds = decide(snaps, Policy(keep_weekly=3), set())
    # weeks: 29-31 Jan (W05, newest Wed 31), 22-28 (W04, newest Sun 28), 15-21 (W03, newest Sun 21)
    assert kept(ds) == [ts(2024, 1, 31, 12), ts(2024, 1, 28, 12), ts(2024, 1, 21, 12)]


def test_decide_keep_monthly():
    snaps = mk([ts(2023, m, d) for m in range(1, 13) for d in (1, 15)])
    ds = decide(snaps, Policy(keep_monthly=3), set())
    assert kept(ds) == [ts(2023, m, 15) for m in (12, 11, 10)]


def test_decide_rules_combine_as_a_union():
    snaps = mk([ts(2024, 5, d, h) for d in range(1, 8) for h in (6, 12, 18)])
    ds = decide(snaps, Policy(keep_last=2, keep_daily=3), set())
    want = {ts(2024, 5, 7, 18), ts(2024, 5, 7, 12),  # last 2
            ts(2024, 5, 6, 18), ts(2024, 5, 5, 18)}  # daily 3 (7th already)
    assert set(kept(ds)) == want
    newest = ds[0]
    assert newest.keep and {"newest", "last", "daily"} <= set(newest.reasons)


def test_decide_cap_wins_over_thinning():
    snaps = mk([ts(2024, 1, 1) + i * 10**9 for i in range(20)])
    ds = decide(snaps, Policy(max=4, keep_last=10), set())
    assert kept(ds) == [s.time_ns for s in snaps[::-1][:4]]
    assert sum(1 for d in ds if not d.keep and any("cap" in r for r in d.reasons)) == 6


def test_decide_pins_kept_and_count_against_cap():
    snaps = mk([ts(2024, 1, 1) + i * 10**9 for i in range(10)])
    pinned = {snaps[0].id, snaps[2].id}  # two old ones
    ds = decide(snaps, Policy(max=4), pinned)
    k = [d.snapshot for d in ds if d.keep]
    assert len(k) == 4
    assert {s.id for s in k} == pinned | {snaps[9].id, snaps[8].id}
    for d in ds:
        if d.snapshot.id in pinned:
            assert "pinned" in d.reasons


def test_decide_pinned_survives_keep_rules():
    snaps = mk([ts(2024, 1, 1) + i * 10**9 for i in range(6)])
    ds = decide(snaps, Policy(keep_last=1), {snaps[1].id})
    assert {d.snapshot.id for d in ds if d.keep} == {snaps[5].id, snaps[1].id}


def test_decide_newest_always_kept():
    # keep_hourly=1 with the newest in its own hour: kept; cap of 1 keeps only it
    snaps = mk([ts(2024, 1, 1, 10), ts(2024, 1, 1, 11), ts(2024, 1, 1, 12)])
    ds = decide(snaps, Policy(max=1), set())
    assert kept(ds) == [ts(2024, 1, 1, 12)]
    assert "newest" in ds[0].reasons


def test_decide_empty():
    assert decide([], Policy(), set()) == []


@pytest.mark.parametrize("kw", [{"max": 0}, {"max": 1001}, {"max": -3}, {"keep_last": -1}, {"keep_daily": -2}])
def test_policy_check_refuses(kw):
    with pytest.raises(InvalidArgument):
        Policy(**kw).check()


def test_policy_check_accepts_bounds():
    Policy(max=1).check()
    Policy(max=1000).check()


# --------------------------------------------------------------- real repos


@pytest.fixture
def repo(tmp_path):
    return init_repo(str(tmp_path / "repo"))


def small_src(tmp_path, i: int) -> str:
    """A tiny source tree whose content differs per `i`."""
    src = str(tmp_path / "src")
    write_file(os.path.join(src, "n.txt"), f"snapshot {i}\n".encode())
    write_file(os.path.join(src, "sub", "shared.bin"), b"shared" * 1000)
    return src


def test_default_cap_65th_commit_drops_oldest(repo, tmp_path):
    src = small_src(tmp_path, 0)
    made, digests = [], {}
    for i in range(64):
        write_file(os.path.join(src, "n.txt"), f"snapshot {i}\n".encode())
        s = snap(repo, "s", [src])
        made.append(s.hex)
        digests[s.hex] = source_digest(src)
        assert s.stats["retention_dropped"] == 0
    assert snapshot_ids(repo, "s") == made

    write_file(os.path.join(src, "n.txt"), b"snapshot 64\n")
    s65 = snap(repo, "s", [src])
    digests[s65.hex] = source_digest(src)
    assert s65.stats["retention_dropped"] == 1
    ids = snapshot_ids(repo, "s")
    assert len(ids) == 64
    assert ids == made[1:] + [s65.hex]  # the oldest went, in the same commit

    write_file(os.path.join(src, "n.txt"), b"snapshot 65\n")
    s66 = snap(repo, "s", [src])
    digests[s66.hex] = source_digest(src)
    ids = snapshot_ids(repo, "s")
    assert ids == made[2:] + [s65.hex, s66.hex]
    assert_verify_clean(repo)
    for sid in (ids[0], ids[31], ids[-1]):
        assert restore_digest(repo, sid) == digests[sid]


def test_cap_is_per_set(repo, tmp_path):
    pit(repo, "policy", "--set", "a", "--max", "2")
    src = small_src(tmp_path, 0)
    for i in range(4):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        snap(repo, "a", [src])
        snap(repo, "b", [src])
    assert len(snapshot_ids(repo, "a")) == 2
    assert len(snapshot_ids(repo, "b")) == 4  # default cap, untouched by a's policy
    assert_verify_clean(repo)


def test_policy_stored_and_applied_at_commit(repo, tmp_path):
    out, _ = pit_json(repo, "policy", "--set", "s", "--max", "5", "--keep-last", "3")
    assert out["max"] == 5 and out["keep_last"] == 3
    shown, _ = pit_json(repo, "policy", "--set", "s")
    assert shown["max"] == 5 and shown["keep_last"] == 3
    src = small_src(tmp_path, 0)
    made = []
    for i in range(6):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        made.append(snap(repo, "s", [src]).hex)
    assert snapshot_ids(repo, "s") == made[-3:]
    assert_verify_clean(repo)


@pytest.mark.parametrize("args", [["--max", "0"], ["--max", "1001"], ["--keep-last", "-1"]])
def test_policy_bad_values_refused(repo, args):
    p = pit(repo, "policy", "--set", "s", *args, expect=InvalidArgument.exit_code)
    assert b"pit: error:" in p.stderr


def test_pins_kept_and_count_against_cap(repo, tmp_path):
    pit(repo, "policy", "--set", "s", "--max", "5")
    src = small_src(tmp_path, 0)
    made = []
    for i in range(3):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        made.append(snap(repo, "s", [src]).hex)
    pit(repo, "pin", made[0])
    pit(repo, "pin", made[1])
    assert get_snapmeta(repo, made[0]).get("pinned") is True
    for i in range(3, 10):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        made.append(snap(repo, "s", [src]).hex)
    ids = snapshot_ids(repo, "s")
    assert len(ids) == 5  # pins count against the cap
    assert ids == made[:2] + made[-3:]
    # forget by policy still keeps them
    out, _ = pit_json(repo, "forget", "--set", "s", "--keep-last", "1")
    assert snapshot_ids(repo, "s") == made[:2] + made[-1:]
    reasons = {d["id"]: d["reasons"] for d in out["decisions"]}
    assert "pinned" in reasons[made[0]] and "pinned" in reasons[made[1]]
    assert_verify_clean(repo)
    # unpinned, it goes
    pit(repo, "unpin", made[0])
    assert not get_snapmeta(repo, made[0]).get("pinned")
    pit(repo, "forget", "--set", "s", "--keep-last", "1")
    assert snapshot_ids(repo, "s") == made[1:2] + made[-1:]
    assert_verify_clean(repo)


def test_pin_past_cap_refused(repo, tmp_path):
    pit(repo, "policy", "--set", "s", "--max", "4")
    src = small_src(tmp_path, 0)
    made = []
    for i in range(4):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        made.append(snap(repo, "s", [src]).hex)
    for sid in made[:3]:
        pit(repo, "pin", sid)
    p = pit(repo, "pin", made[3], expect=PinRefused.exit_code)
    err = p.stderr.decode()
    assert err.startswith("pit: error:") and "cap" in err and len(err.strip().splitlines()) == 1
    assert not get_snapmeta(repo, made[3]).get("pinned")
    pit(repo, "pin", made[0])  # pinning an already pinned one is not a new pin
    # with three pins and a cap of 4, new snapshots still commit and the newest is kept
    for i in range(4, 7):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        newest = snap(repo, "s", [src]).hex
    assert snapshot_ids(repo, "s") == made[:3] + [newest]


def test_lowering_cap_below_pins_keeps_pins_and_newest(repo, tmp_path):
    src = small_src(tmp_path, 0)
    made = []
    for i in range(5):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        made.append(snap(repo, "s", [src]).hex)
    pit(repo, "pin", made[0])
    pit(repo, "pin", made[1])
    pit(repo, "forget", "--set", "s", "--max", "2")
    ids = snapshot_ids(repo, "s")
    # pins are never dropped by retention; the newest is always kept
    assert made[0] in ids and made[1] in ids and made[-1] in ids
    assert_verify_clean(repo)


def test_forget_dry_run_changes_nothing(repo, tmp_path):
    src = small_src(tmp_path, 0)
    made = []
    for i in range(6):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        made.append(snap(repo, "s", [src]).hex)

    def pack_hashes():
        out = {}
        for name in pack_files(repo):
            p = os.path.join(repo, "packs", name[14:16], name)
            with open(p, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
        return out

    before = pack_hashes()
    out, _ = pit_json(repo, "forget", "--set", "s", "--keep-last", "2", "--dry-run")
    assert out["dry_run"] is True
    assert out["dropped"]["snapshots"] == 0
    would = [d["id"] for d in out["decisions"] if not d["keep"]]
    assert sorted(would) == sorted(made[:4])
    assert snapshot_ids(repo, "s") == made
    assert pack_hashes() == before  # not even a tombstone frame was written
    text = pit(repo, "forget", "--set", "s", "--keep-last", "2", "-n").stdout.decode()
    assert text.count("would drop") == 4
    assert snapshot_ids(repo, "s") == made

    out, _ = pit_json(repo, "forget", "--set", "s", "--keep-last", "2")
    assert out["dry_run"] is False
    assert out["dropped"]["snapshots"] == 4
    assert out["dropped"]["blobs_freed"] >= 4  # at least each dropped snapshot's own root tree
    assert snapshot_ids(repo, "s") == made[4:]
    assert_verify_clean(repo)


def test_forget_named_snapshots(repo, tmp_path):
    src = small_src(tmp_path, 0)
    made, digests = [], {}
    for i in range(4):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        s = snap(repo, "s", [src])
        made.append(s.hex)
        digests[s.hex] = source_digest(src)
    snap(repo, "other", [src])
    out, _ = pit_json(repo, "forget", "--set", "s", made[1], made[2][:12])
    assert out["dropped"]["snapshots"] == 2
    assert {d["id"] for d in out["decisions"]} == {made[1], made[2]}
    assert snapshot_ids(repo, "s") == [made[0], made[3]]
    for sid in (made[0], made[3]):
        assert restore_digest(repo, sid) == digests[sid]
    assert_verify_clean(repo)


def test_forget_refuses_pinned_and_foreign(repo, tmp_path):
    src = small_src(tmp_path, 0)
    a = snap(repo, "s", [src]).hex
    write_file(os.path.join(src, "n.txt"), b"x")
    b = snap(repo, "other", [src]).hex
    pit(repo, "pin", a)
    pit(repo, "forget", "--set", "s", a, expect=InvalidArgument.exit_code)
    pit(repo, "forget", "--set", "s", b, expect=InvalidArgument.exit_code)
    pit(repo, "forget", "--set", "s", "ffffffffffff", expect=15)
    assert snapshot_ids(repo) == [a, b]
    assert_verify_clean(repo)


def test_cap_holds_even_when_lowered_below_the_pins(repo, tmp_path):
    """The cap is the promise ('a set never holds more'). Lowering it to the number
    of pins must be refused (no room would be left for the newest snapshot), or
    else the set must still hold no more than the cap."""
    src = small_src(tmp_path, 0)
    made = []
    for i in range(4):
        write_file(os.path.join(src, "n.txt"), f"{i}".encode())
        made.append(snap(repo, "s", [src]).hex)
    pit(repo, "pin", made[0])
    pit(repo, "pin", made[1])
    p = pit(repo, "policy", "--set", "s", "--max", "2", expect=None)
    if p.returncode != 0:
        assert p.returncode in (InvalidArgument.exit_code, PinRefused.exit_code)
        return
    write_file(os.path.join(src, "n.txt"), b"more")
    snap(repo, "s", [src])
    n = len(snapshot_ids(repo, "s"))
    assert n <= 2, f"policy --max 2 was accepted with 2 pins, and the set now holds {n} snapshots"
