"""Measurement helpers for the benchmarks: timed commands, cache drops, sizes, tree digests.

A command runs under ``/usr/bin/time -f %M`` (apt package ``time``, installed
if missing) and is reaped with ``os.wait4``: wall clock from
``perf_counter``, user and system CPU from the rusage of wait4 (they include
the command's waited-for descendants), peak RSS from GNU time.  Peak RSS
cannot come from our own wait4: Linux carries the pre-exec high-water RSS of
the forked parent into the child's ``ru_maxrss``, so a child of a Python
process holding 500 MiB reports at least 500 MiB.  GNU time is a small
process, so the command it forks starts from a small high-water mark.
A command that works in several processes (pit's snapshot and deep verify
workers) reports the peak of their summed RSS, sampled every 50 ms, when
that is higher than its largest process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time

MB = 1_000_000
MIB = 1 << 20


@dataclasses.dataclass
class Result:
    cmd: list[str]
    rc: int
    wall: float            # seconds
    user: float
    sys: float
    maxrss_mib: float
    stdout: str = ""
    stderr: str = ""

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def check(self) -> "Result":
        if self.rc != 0:
            raise CommandFailed(self)
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cpu"] = round(self.cpu, 3)
        d["stdout"] = self.stdout[-4000:]
        d["stderr"] = self.stderr[-4000:]
        return d


class CommandFailed(RuntimeError):
    def __init__(self, result: Result):
        self.result = result
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        super().__init__(f"exit {result.rc}: {' '.join(result.cmd)}\n  " + "\n  ".join(tail))


def run(cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
        stdin_data: bytes | None = None, log_prefix: str | None = None) -> Result:
    """Run ``cmd`` to completion and return its wall time, CPU time and peak RSS.

    stdout/stderr go to files (``log_prefix``.out/.err when given, else
    temporary ones) so a chatty tool cannot block on a full pipe, and are also
    returned in the result.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    if log_prefix:
        os.makedirs(os.path.dirname(log_prefix) or ".", exist_ok=True)
        out_path, err_path = log_prefix + ".out", log_prefix + ".err"
    else:
        import tempfile
        fd1, out_path = tempfile.mkstemp(prefix="bench-out-")
        fd2, err_path = tempfile.mkstemp(prefix="bench-err-")
        os.close(fd1)
        os.close(fd2)
    gnu_time = _gnu_time()
    rss_path = None
    if gnu_time:
        import tempfile
        fd, rss_path = tempfile.mkstemp(prefix="bench-rss-")
        os.close(fd)
        cmd_run = [gnu_time, "-f", "%M", "-o", rss_path, *cmd]
    else:
        cmd_run = list(cmd)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd_run, env=full_env, cwd=cwd, stdout=out, stderr=err,
                             stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL)
        if stdin_data is not None:
            try:
                p.stdin.write(stdin_data)
            except BrokenPipeError:
                pass
            p.stdin.close()
        sampler = _TreeRss(p.pid)
        _pid, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop()
        p.returncode = os.waitstatus_to_exitcode(status)
    with open(out_path, "rb") as f:
        stdout = f.read().decode(errors="replace")
    with open(err_path, "rb") as f:
        stderr = f.read().decode(errors="replace")
    if not log_prefix:
        os.unlink(out_path)
        os.unlink(err_path)
    maxrss_kib = ru.ru_maxrss        # overstated, see the module docstring
    if rss_path:
        with open(rss_path) as f:
            last = f.read().strip().splitlines()
        os.unlink(rss_path)
        if last and last[-1].strip().isdigit():
            maxrss_kib = int(last[-1])
    # A command that works in several processes (pit's workers) holds the sum.
    maxrss_kib = max(maxrss_kib, sampler.peak_kib)
    return Result(cmd=list(cmd), rc=p.returncode, wall=wall, user=ru.ru_utime,
                  sys=ru.ru_stime, maxrss_mib=maxrss_kib / 1024, stdout=stdout,
                  stderr=stderr)


def children(pid: int) -> list[int]:
    """The direct children of `pid` (from every one of its threads), read from /proc."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


class _TreeRss:
    """Samples, every 50 ms, the summed VmRSS of a process's descendants
    (found through /proc/PID/task/TID/children, cheap enough not to disturb
    the run); `peak_kib` is the highest sum seen. GNU time's %M is the
    largest single process, which understates a command with workers."""

    def __init__(self, pid: int, root: bool = False) -> None:
        """`root`: count the process itself too (an agent and its workers)."""
        import threading

        self.pid, self.peak_kib, self.root = pid, 0, root
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def _run(self) -> None:
        while not self._done.wait(0.05):
            # the root is GNU time (or the command: counted by %M), unless asked for
            total, todo = self._rss(self.pid) if self.root else 0, children(self.pid)
            while todo:
                q = todo.pop()
                total += self._rss(q)
                todo += children(q)
            self.peak_kib = max(self.peak_kib, total)

    def stop(self) -> None:
        self._done.set()
        self._t.join()


_GNU_TIME: list = []


def _gnu_time() -> str | None:
    """/usr/bin/time, installing apt package ``time`` once if it is missing."""
    if not _GNU_TIME:
        path = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
        if path is None and shutil.which("apt-get"):
            _GNU_TIME.append(None)     # no recursion through run() while installing
            apt_install(["time"])
            _GNU_TIME.clear()
            path = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
        _GNU_TIME.append(path)
    return _GNU_TIME[0]


def timed(fn, *args, **kw) -> tuple[float, object]:
    """(wall seconds, result) of an in-process call."""
    t0 = time.perf_counter()
    r = fn(*args, **kw)
    return time.perf_counter() - t0, r


def drop_caches() -> bool:
    """sync, then drop the guest page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def du(path: str) -> dict:
    """Bytes on disk (allocated blocks, like ``du -s -B1``) and apparent bytes."""
    alloc = apparent = 0
    if os.path.isfile(path):
        st = os.lstat(path)
        return {"disk": st.st_blocks * 512, "apparent": st.st_size}
    seen = set()
    for dirpath, _dirs, files in os.walk(path):
        st = os.lstat(dirpath)
        alloc += st.st_blocks * 512
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return {"disk": alloc, "apparent": apparent}


def tree_digest(root: str) -> dict[str, tuple[int, str]]:
    """{relative path: (size, blake3 hex)} for every regular file under root."""
    import blake3
    out = {}
    buf = bytearray(4 * MIB)
    view = memoryview(buf)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            h = blake3.blake3()
            size = 0
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
                    size += n
            out[os.path.relpath(p, root)] = (size, h.hexdigest())
    return out


def compare_digests(expected: dict, got: dict, limit: int = 10) -> list[str]:
    """Human-readable differences between two tree digests (empty when equal)."""
    diffs = []
    for rel in sorted(expected.keys() - got.keys())[:limit]:
        diffs.append(f"missing: {rel}")
    for rel in sorted(got.keys() - expected.keys())[:limit]:
        diffs.append(f"extra: {rel}")
    for rel in sorted(expected.keys() & got.keys()):
        if expected[rel] != got[rel]:
            diffs.append(f"differs: {rel}")
            if len(diffs) >= 3 * limit:
                break
    return diffs


def rmtree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


def which_or_install(binary: str, package: str) -> str | None:
    """Path of ``binary``, installing the apt ``package`` if it is missing."""
    path = shutil.which(binary)
    if path:
        return path
    if apt_install([package]):
        return shutil.which(binary)
    return None


def apt_install(packages: list[str]) -> bool:
    """apt-get install; runs apt-get update and retries only if the first try fails."""
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    if shutil.which("apt-get") is None:
        return False
    if run(cmd, env=env).rc == 0:
        return True
    run(["apt-get", "update", "-q"], env=env)
    return run(cmd, env=env).rc == 0
