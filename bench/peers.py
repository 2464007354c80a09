"""restic and BorgBackup drivers, configured as in the peer baseline.

- restic (Debian 0.14.0): ``init --repository-version 2``; ``backup --host bench
  --compression auto``; encryption is always on, so ``RESTIC_PASSWORD`` is set
  (0.14 has no ``--insecure-no-password``); ``RESTIC_CACHE_DIR`` lives in scratch.
- borg (Debian 1.2.4): ``init --encryption=none``; ``create --compression
  zstd,3``; ``BORG_BASE_DIR`` (cache, security, config) lives in scratch.

Both back up the dataset by its base name from its parent directory, as the
baseline did.  Each step returns a ``measure.Result`` (wall, CPU, peak RSS).
"""

from __future__ import annotations

import os
import re
import shutil

import measure


def ensure_installed() -> dict[str, str | None]:
    """Install restic and borgbackup from apt if missing; {name: version or None}."""
    missing = [pkg for binary, pkg in (("restic", "restic"), ("borg", "borgbackup"))
               if shutil.which(binary) is None]
    if missing:
        measure.apt_install(missing)
    return {"restic": restic_version(), "borg": borg_version()}


def restic_version() -> str | None:
    if not shutil.which("restic"):
        return None
    r = measure.run(["restic", "version"])
    m = re.search(r"restic (\S+)", r.stdout)
    return m.group(1) if r.rc == 0 and m else None


def borg_version() -> str | None:
    if not shutil.which("borg"):
        return None
    r = measure.run(["borg", "--version"])
    m = re.search(r"borg (\S+)", r.stdout)
    return m.group(1) if r.rc == 0 and m else None


class Tool:
    """A backup program driven step by step over one repository."""

    name = "tool"
    version: str | None = None

    def __init__(self, repo: str, scratch: str, logs: str, label: str | None = None):
        self.repo = repo
        self.scratch = scratch
        self.logs = logs
        self.label = label or self.name
        self.nsnap = 0

    def _run(self, step: str, cmd: list[str], **kw) -> measure.Result:
        return measure.run(cmd, env=self.env(), log_prefix=os.path.join(
            self.logs, f"{self.label}-{step}"), **kw)

    def env(self) -> dict:
        return {}

    def size(self) -> dict:
        return measure.du(self.repo)

    def restored_root(self, target: str, source: str) -> str:
        """Where a restore into ``target`` put the copy of ``source``."""
        base = os.path.basename(os.path.normpath(source))
        for cand in (os.path.join(target, base),
                     os.path.join(target, os.path.abspath(source).lstrip("/"))):
            if os.path.isdir(cand):
                return cand
        raise FileNotFoundError(f"{self.label}: no restored copy of {source} under {target}")


class Restic(Tool):
    name = "restic"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.version = restic_version()

    def env(self) -> dict:
        return {"RESTIC_REPOSITORY": self.repo, "RESTIC_PASSWORD": "peerbench",
                "RESTIC_CACHE_DIR": os.path.join(self.scratch, "restic-cache")}

    def init(self) -> measure.Result:
        return self._run("init", ["restic", "init", "--repository-version", "2"])

    def backup(self, source: str, changes: str | None = None) -> measure.Result:
        self.nsnap += 1
        parent, base = os.path.split(os.path.abspath(source))
        return self._run(f"backup{self.nsnap}", [
            "restic", "backup", "--host", "bench", "--compression", "auto", base],
            cwd=parent)

    def restore(self, target: str) -> measure.Result:
        return self._run("restore", ["restic", "restore", "latest", "--target", target])

    def check(self) -> measure.Result:
        return self._run("check", ["restic", "check", "--read-data"])


class Borg(Tool):
    name = "borg"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.version = borg_version()

    def env(self) -> dict:
        return {"BORG_REPO": self.repo,
                "BORG_BASE_DIR": os.path.join(self.scratch, "borg-base"),
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def init(self) -> measure.Result:
        return self._run("init", ["borg", "init", "--encryption=none"])

    def backup(self, source: str, changes: str | None = None) -> measure.Result:
        self.nsnap += 1
        parent, base = os.path.split(os.path.abspath(source))
        return self._run(f"backup{self.nsnap}", [
            "borg", "create", "--compression", "zstd,3", f"::s{self.nsnap:03d}", base],
            cwd=parent)

    def restore(self, target: str) -> measure.Result:
        os.makedirs(target, exist_ok=True)
        return self._run("restore", ["borg", "extract", f"::s{self.nsnap:03d}"], cwd=target)

    def check(self) -> measure.Result:
        return self._run("check", ["borg", "check", "--verify-data"])


if __name__ == "__main__":
    print(ensure_installed())
