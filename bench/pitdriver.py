"""Drive the pitstore CLI (``.venv/bin/pit``) as a subprocess, like the peers.

Running the real console script means interpreter start-up and imports are
counted, as restic's and borg's start-up is.  Each instance gets its own
``XDG_CACHE_HOME`` so two repositories in one run cannot share a cache.
"""

from __future__ import annotations

import json
import os
import re

import measure
from peers import Tool

HERE = os.path.dirname(os.path.abspath(__file__))
PIT = os.environ.get("PIT_BIN") or os.path.join(os.path.dirname(HERE), ".venv", "bin", "pit")
SET = "bench"

# PIT_SRC: a pinned copy of the source (``git archive COMMIT store davserver
# replicator | tar -x -C DIR``) that every pit subprocess imports instead of the
# work tree the venv's editable install points at, so a long run measures one
# build even while someone edits store/.  It goes first on PYTHONPATH (the
# editable finder comes after the path finder).
PIT_SRC = os.environ.get("PIT_SRC")
if PIT_SRC:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.abspath(PIT_SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pit_help(*sub: str) -> str | None:
    """``pit [sub] --help`` text, or None when the CLI does not run yet."""
    if not os.path.exists(PIT):
        return None
    r = measure.run([PIT, *sub, "--help"])
    return r.stdout if r.rc == 0 else None


def pit_available() -> bool:
    h = pit_help()
    return bool(h) and "snapshot" in h


def pit_commands() -> set[str]:
    """Sub-command names listed by ``pit --help`` (click's "Commands:" block)."""
    h = pit_help() or ""
    block = h.split("Commands:", 1)[1] if "Commands:" in h else ""
    return set(re.findall(r"^\s{2}([a-z][\w-]*)", block, re.M))


def pit_version() -> str | None:
    r = measure.run([PIT, "--version"]) if os.path.exists(PIT) else None
    if r and r.rc == 0:
        return r.stdout.strip().split()[-1]
    r = measure.run([os.path.join(os.path.dirname(PIT), "python"), "-c",
                     "import importlib.metadata as m; print(m.version('pitstore'))"])
    return r.stdout.strip() if r.rc == 0 else None


def pit_source_digest() -> str:
    """Short digest of store/*.py, to tell engine builds apart while the version is fixed."""
    import hashlib
    h = hashlib.sha256()
    src = os.path.join(os.path.abspath(PIT_SRC) if PIT_SRC else os.path.dirname(HERE), "store")
    for name in sorted(os.listdir(src)) if os.path.isdir(src) else []:
        if name.endswith(".py"):
            h.update(name.encode())
            with open(os.path.join(src, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


class Pit(Tool):
    name = "pitstore"

    def __init__(self, *a, avg_chunk_size: int | None = None, encrypt: bool = False, **kw):
        super().__init__(*a, **kw)
        self.avg_chunk_size = avg_chunk_size
        self.encrypt = encrypt  # pit init --encrypt, opened by a key file (no KDF in every command's time)
        self.key_file = os.path.join(self.scratch, f"pit-{self.label}.key")
        self.version = pit_version()
        self.source_digest = pit_source_digest()
        self._snapshot_json: bool | None = None
        self.last_snapshot: dict | None = None

    def env(self) -> dict:
        env = {"XDG_CACHE_HOME": os.path.join(self.scratch, f"xdg-cache-{self.label}"),
               "PIT_REPO": self.repo}
        if self.encrypt:
            env["PIT_KEY_FILE"] = self.key_file
        return env

    def cmd(self, *args: str) -> list[str]:
        return [PIT, "--repo", self.repo, *args]

    def init(self) -> measure.Result:
        extra = ["--avg-chunk-size", str(self.avg_chunk_size)] if self.avg_chunk_size else []
        if self.encrypt:
            extra += ["--encrypt"]  # PIT_KEY_FILE (env above): made by init
        return self._run("init", self.cmd("init", *extra))

    def backup(self, source: str, changes: str | None = None) -> measure.Result:
        """``pit snapshot`` (with ``--json`` when the CLI has it: see last_snapshot)."""
        self.nsnap += 1
        extra = ["--changes", changes] if changes else []
        if self._snapshot_json is None:
            self._snapshot_json = "--json" in (pit_help("snapshot") or "")
        if self._snapshot_json:
            extra.append("--json")
        r = self._run(f"backup{self.nsnap}", self.cmd(
            "snapshot", "--set", SET, *extra, os.path.abspath(source)))
        self.last_snapshot = _json(r.stdout) if self._snapshot_json and r.rc == 0 else None
        return r

    def restore(self, target: str) -> measure.Result:
        return self._run("restore", self.cmd("restore", f"{SET}@latest", "--target", target))

    def check_command(self) -> list[str] | None:
        """The deep-verify command, if this build of the CLI has one."""
        cmds = pit_commands()
        for name in ("verify", "check"):
            if name in cmds:
                h = pit_help(name) or ""
                deep = [f for f in ("--deep", "--read-data", "--verify-data") if f in h][:1]
                if "--recheck-after" in h:    # read every chunk, like the peers' checks
                    deep += ["--recheck-after", "0"]
                return self.cmd(name, *deep)
        return None

    def check(self) -> measure.Result:
        cmd = self.check_command()
        if cmd is None:
            raise NotImplementedError("pit has no verify/check command yet")
        return self._run("check", cmd)

    def layout(self) -> dict[str, int]:
        """Bytes on disk per top-level entry of the repo (packs, index, ...)."""
        if not os.path.isdir(self.repo):
            return {}
        return {name: measure.du(os.path.join(self.repo, name))["disk"]
                for name in sorted(os.listdir(self.repo))}

    def stats(self) -> dict:
        r = self._run("stats", self.cmd("stats", "--json"))
        return _json(r.stdout) if r.rc == 0 else {"error": r.stderr.strip()[-500:]}

    def snapshots(self) -> list | dict:
        r = self._run("snapshots", self.cmd("snapshots", "--json"))
        return _json(r.stdout) if r.rc == 0 else {"error": r.stderr.strip()[-500:]}


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return {"unparsed": text[-2000:]}


def find_number(obj, *words: str) -> int | float | None:
    """First numeric value in nested JSON whose key contains all ``words``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if all(w in k.lower() for w in words) and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                return v
        for v in obj.values():
            n = find_number(v, *words)
            if n is not None:
                return n
    elif isinstance(obj, list):
        for v in obj:
            n = find_number(v, *words)
            if n is not None:
                return n
    return None
