"""Image selection for failover: the newest snapshot of a set that is proven good.

Walk the set's snapshots newest to oldest (at most `max_images`, 64 by
default). For each: deep-verify it (`store.verify.verify`; chunks read good
within `recheck_after` seconds are not read again, so the next-older image
costs only what it does not share with the newer ones), then materialise it
into a scratch directory (`store.restore.Restorer`) and run the set's
application check (`replicator.apps.templates.check_image`). The first image that
passes both is chosen; every newer image carries the reason it was skipped,
every older one is "not examined".

An image whose point hooks failed (snapmeta `point` = {ok: false}, written by
`replicator.apps.hooks.mark_point`) is skipped without being read.

Outcomes are recorded per snapshot in the store's snapmeta, beside the
`verify` record the verifier writes: `app_check` = {time, template, result
("good"/"failed"), message} and `image` = {time, status, reason}.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from store.errors import InvalidArgument, StoreError

from ..apps.templates import CheckResult, check_image
from ..errors import NoGoodImage, NoImages, PinnedImageBad

DEFAULT_RECHECK = 3600.0
MAX_IMAGES = 64


@dataclass
class ImageOutcome:
    id: str
    short: str
    name: str
    time: str
    time_ns: int
    status: str = "not examined"      # chosen | pinned | skipped | not examined
    reason: str | None = None          # why skipped
    verify: dict | None = None         # {result, depth, chunks_read, chunks_skipped_recent, damage: [...]}
    check: dict | None = None          # CheckResult.to_json()
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Selection:
    set: str
    repo: str
    chosen: ImageOutcome | None = None
    images: list[ImageOutcome] = field(default_factory=list)   # newest first
    pinned: bool = False
    image_dir: str | None = None       # the chosen image, materialised (keep_image=True); the caller removes it
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"set": self.set, "repo": self.repo, "chosen": self.chosen.to_json() if self.chosen else None,
                "pinned": self.pinned, "image_dir": self.image_dir, "notes": self.notes, "seconds": self.seconds,
                "images": [i.to_json() for i in self.images]}


def _damage_reason(label: str, damage: list) -> str:
    paths, first = [], None
    for d in damage:
        for p in d.paths:
            if p.startswith(label + ":"):
                paths.append(p[len(label) + 1:])
                first = first or d
    d = first or damage[0]
    where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "") if paths else "?"
    return f"damage found at {where} ({d.kind} {d.blob[:16]} in {d.where}: {d.reason})"


def _materialise(repo, snap, target: str) -> None:
    from store.objects import ObjectReader
    from store.restore import Restorer

    with repo.reading() as txn:
        r = ObjectReader(repo, txn)
        Restorer(r).restore(r.lookup(snap.root, ""), target)


def select_image(repo_path, set_name: str, check=None, max_images: int = MAX_IMAGES, deep: bool = True, *,
                 pin: str | None = None, recheck_after: float = DEFAULT_RECHECK, scratch_dir: str | None = None,
                 keep_image: bool = False, record: bool = True, lock_wait: float = 10.0,
                 progress: Callable[[ImageOutcome], None] | None = None) -> Selection:
    """Choose the newest image of `set_name` that verifies and passes the application check.

    `repo_path`: a repository path, or an open `store.repository.Repository`
    (an agent that holds its repository open must pass it: LMDB allows one
    environment per process). `check`: None (verify only), the set's
    configuration (a dict with an `app` table: its template's check), or a
    callable (image_dir, snapshot) -> CheckResult. `pin`: a snapshot spec
    (id prefix, SET@NAME, SET@-N) the operator chose; it is verified and
    checked, and returned as is, or PinnedImageBad is raised.

    Raises NoImages when the set has no snapshots, NoGoodImage (with
    `.selection`) when none passes, CheckUnavailable when the check cannot run
    here. `keep_image`: leave the chosen image materialised in
    `selection.image_dir` for promotion (the caller removes it)."""
    from store.repository import Repository
    from store.snapshots import list_snapshots, resolve

    if not 1 <= max_images <= 1000:
        raise InvalidArgument("max_images must be between 1 and 1000")
    t_start = time.monotonic()
    own = not isinstance(repo_path, Repository)
    repo = Repository(repo_path, readonly=not record, lock_wait=lock_wait) if own else repo_path
    record = record and not repo.readonly
    sel = Selection(set_name, repo.path)
    try:
        with repo.reading() as txn:
            snaps = list_snapshots(repo, txn, set_name)
            pinned = resolve(repo, txn, pin) if pin else None
        if not snaps:
            raise NoImages(f"set {set_name!r} has no snapshots in {repo.path}")
        if pinned is not None and pinned.set != set_name:
            raise InvalidArgument(f"snapshot {pinned.set}@{pinned.name} belongs to set {pinned.set!r}, not {set_name!r}")
        newest = list(reversed(snaps))
        if len(newest) > max_images:
            sel.notes.append(f"{len(newest) - max_images} older images not considered (max_images {max_images})")
            newest = newest[:max_images]
        if pinned is not None and all(s.id != pinned.id for s in newest):
            newest.append(pinned)
        outcomes = {s.id: ImageOutcome(s.hex, s.short, s.name, s.time_iso, s.time_ns) for s in newest}
        sel.images = [outcomes[s.id] for s in newest]
        if check is None:
            sel.notes.append("no application check: images are chosen by verification alone")
        scratch = scratch_dir or os.path.join(repo.path, "tmp-failover")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        todo = [pinned] if pinned is not None else newest
        for s in todo:
            o = outcomes[s.id]
            good, image_dir = _examine(repo, s, o, check, deep, recheck_after, scratch, keep_image, lock_wait, sel,
                                       pinned is not None)
            if good:
                o.status = "pinned" if pinned is not None else "chosen"
                sel.chosen, sel.pinned, sel.image_dir = o, pinned is not None, image_dir
            if record:
                _record(repo, s, o, lock_wait, sel)
            if progress:
                progress(o)
            if good:
                break
        sel.seconds = round(time.monotonic() - t_start, 3)
        if pinned is not None and sel.chosen is None:
            o = outcomes[pinned.id]
            raise PinnedImageBad(f"pinned image {set_name}@{o.name} ({o.short}) {o.reason}", selection=sel)
        if sel.chosen is None:
            skipped = [i for i in sel.images if i.status == "skipped"]
            raise NoGoodImage(f"no image of set {set_name!r} passed ({len(skipped)} examined); newest "
                              f"{skipped[0].name}: {skipped[0].reason}" if skipped else
                              f"no image of set {set_name!r} passed", selection=sel)
        return sel
    finally:
        if own:
            repo.close()


def _examine(repo, s, o: ImageOutcome, check, deep: bool, recheck_after: float, scratch: str, keep_image: bool,
             lock_wait: float, sel: Selection, pinned: bool = False) -> tuple[bool, str | None]:
    from store.verify import verify

    from store.snapmeta import get_meta

    t0 = time.monotonic()
    try:
        with repo.reading() as txn:
            point = get_meta(repo, txn, s.id).get("point")
        if isinstance(point, dict) and point.get("ok") is False:
            why = f"point hooks failed: {point.get('error') or 'no reason recorded'}"
            if not pinned:
                o.status, o.reason = "skipped", why
                return False, None
            sel.notes.append(f"pinned image {s.name}: {why} (kept: the operator chose it)")
        rep = verify(repo, snapshots=[s], depth="deep" if deep else "structural", recheck_after=recheck_after,
                     record=not repo.readonly, lock_wait=lock_wait)
        label = f"{s.set}@{s.name}"
        o.verify = {"result": "damaged" if rep.damage else "good", "depth": rep.depth, "chunks": rep.chunks,
                    "chunks_read": rep.chunks_read, "chunks_skipped_recent": rep.chunks_skipped_recent,
                    "damage": [d.to_json() for d in rep.damage[:10]]}
        for n in rep.notes:
            if n not in sel.notes:
                sel.notes.append(n)
        if rep.damage:
            o.status, o.reason = "skipped", _damage_reason(label, rep.damage)
            return False, None
        if check is None:
            return True, None
        image_dir = tempfile.mkdtemp(prefix=f"{s.short}-", dir=scratch)
        keep = False
        try:
            try:
                _materialise(repo, s, image_dir)
            except StoreError as exc:
                o.status, o.reason = "skipped", f"could not be materialised: {exc}"
                return False, None
            if callable(check):
                res = check(image_dir, s)
            else:
                res = check_image(check, image_dir, may_modify=not keep_image)
            o.check = res.to_json() if isinstance(res, CheckResult) else {"ok": bool(res), "message": str(res)}
            if not o.check.get("ok"):
                o.status, o.reason = "skipped", f"app check failed: {o.check.get('message')}"
                return False, None
            keep = keep_image
            return True, (image_dir if keep else None)
        finally:
            if not keep:
                shutil.rmtree(image_dir, ignore_errors=True)
    finally:
        o.seconds = round(time.monotonic() - t0, 3)


def _record(repo, s, o: ImageOutcome, lock_wait: float, sel: Selection) -> None:
    from store.errors import RepositoryLocked
    from store.snapmeta import update_meta

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    changes = {"image": {"time": stamp, "status": o.status, "reason": o.reason}}
    if o.check is not None:
        changes["app_check"] = {"time": stamp, "template": o.check.get("template"),
                                "result": "good" if o.check.get("ok") else "failed", "message": o.check.get("message")}
    try:
        with repo.writer(lock_wait=lock_wait) as w:
            if w.txn.get(s.id, db=w.db["snapshots"]) is not None:
                update_meta(w, s.id, **changes)
                if o.status in ("chosen", "pinned"):
                    _supersede(w, s, stamp)
    except RepositoryLocked:
        note = "outcomes not recorded: the repository was locked by a writer"
        if note not in sel.notes:
            sel.notes.append(note)


def _supersede(w, s, stamp: str) -> None:
    """One image of a set is the failover image: an earlier selection's choice says it was superseded."""
    from store.snapmeta import get_meta, update_meta
    from store.snapshots import list_snapshots

    for other in list_snapshots(w.repo, w.txn, s.set):
        if other.id == s.id:
            continue
        img = get_meta(w.repo, w.txn, other.id).get("image") or {}
        if img.get("status") in ("chosen", "pinned"):
            update_meta(w, other.id, image={**img, "status": "superseded", "time": stamp,
                                            "reason": f"a later selection chose {s.name}"})


def image_status(repo, txn, sid: bytes) -> dict:
    """What selection recorded about a snapshot: {'app_check': {...} | None, 'image': {...} | None}."""
    from store.snapmeta import get_meta

    try:
        meta = get_meta(repo, txn, sid)
    except Exception:
        meta = {}
    return {"app_check": meta.get("app_check"), "image": meta.get("image")}
