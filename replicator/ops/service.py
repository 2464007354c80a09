"""systemd units for a pit node, and `pit install-service`'s work.

The unit texts live here (not under docs/, which is not installed) and are
rendered with the node's paths; `docs/examples/systemd/` holds them rendered
with the defaults (a test keeps the two equal). See docs/operators.md.

The agent runs as root on purpose: it reads every protected path, and on a
secondary a promotion writes the sets back to their live paths (which may be
under /etc, /home or /var/lib) and runs takeover hooks that start services,
move addresses and update DNS. Its sandbox therefore only takes away what no
part of that needs (kernel tunables and modules, the clock, realtime, other
architectures' system calls); `pit serve`, the scrub and etcd get tight ones.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from ..errors import ConfigError

UNIT_DIR = "etc/systemd/system"

DEFAULTS = {
    "pit": "/usr/local/bin/pit",
    "agent_config": "/etc/pit/agent.toml",
    "serve_config": "/etc/pit/serve.toml",
    "repo": "/var/lib/pit/repo",
    "state": "/var/lib/pit",
    "etcd": "/usr/bin/etcd",
    "etcd_name": "primary",
    "etcd_client": "http://10.0.0.1:2379",
    "etcd_peer": "http://10.0.0.1:2380",
    "etcd_initial_cluster": "primary=http://10.0.0.1:2380,r1=http://10.0.0.2:2380,r2=http://10.0.0.3:2380",
}

AGENT = """\
[Unit]
Description=pitstore agent: replication, consistent points, failover
# See docs/operators.md in pitstore's source.
Wants=network-online.target
After=network-online.target local-fs.target

[Service]
Type=simple
ExecStart={pit} agent --config {agent_config}
Restart=on-failure
RestartSec=5
# SIGTERM to the agent alone: it closes its links and finishes the commit in
# progress; its hooks are not killed under it. Whatever is left is killed
# after TimeoutStopSec (a demote hook may run up to failover.hook_timeout).
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=120
Environment=PYTHONUNBUFFERED=1
LimitNOFILE=65536
UMask=0077
# Root, and able to read (and, on a secondary, write back) every protected
# path: no ProtectHome, ProtectSystem only for /usr and /boot.
ProtectSystem=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""

SERVE = """\
[Unit]
Description=pitstore restore view: the repository read-only over WebDAV
# See docs/restore.md in pitstore's source.
Wants=network-online.target
After=network-online.target local-fs.target

[Service]
Type=simple
ExecStart={pit} --repo {repo} serve -c {serve_config}
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30
Environment=PYTHONUNBUFFERED=1
# Reads the repository; writes only its LMDB reader slots, the versions
# index and the self-signed certificate under it.
ProtectSystem=strict
ReadWritePaths={repo}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
"""

SCRUB = """\
[Unit]
Description=pitstore scrub: deep verification of the repository
# See docs/operators.md in pitstore's source.
After=local-fs.target

[Service]
Type=oneshot
# Exit 3 (damage found) leaves the unit failed: `systemctl --failed` shows it,
# and the report is in the journal (journalctl -u pit-scrub).
ExecStart={pit} --repo {repo} verify --deep
Nice=19
IOSchedulingClass=idle
CPUSchedulingPolicy=batch
Environment=PYTHONUNBUFFERED=1
ProtectSystem=strict
ReadWritePaths={repo}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateNetwork=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
LockPersonality=yes
SystemCallArchitectures=native
"""

SCRUB_TIMER = """\
[Unit]
Description=weekly pitstore scrub (pit verify --deep)
# See docs/operators.md in pitstore's source.

[Timer]
OnCalendar=Sun *-*-* 02:00:00
RandomizedDelaySec=4h
AccuracySec=1h
Persistent=true
Unit=pit-scrub.service

[Install]
WantedBy=timers.target
"""

ETCD = """\
[Unit]
Description=etcd member {etcd_name} for pitstore failover
# See docs/failover.md in pitstore's source.
Wants=network-online.target
After=network-online.target local-fs.target
# Debian's etcd-server ships its own etcd.service on the same ports.
Conflicts=etcd.service

[Service]
# etcd tells systemd when it serves, which for a member of several waits for a
# quorum: no start timeout (install-service enables it with --no-block).
Type=notify
NotifyAccess=main
TimeoutStartSec=infinity
# The same flags as `pit etcd start` (replicator/ops/etcd_members.py), in the
# foreground. --initial-cluster* only matter at the first start: etcd ignores
# them once {state}/etcd/data holds a member.
ExecStart={etcd_argv}
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30
LimitNOFILE=65536
ProtectSystem=strict
ReadWritePaths={state_etcd}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
"""

# unit name -> (files it writes, the one `enable` is given)
UNITS = {
    "agent": ({"pit-agent.service": AGENT}, "pit-agent.service"),
    "serve": ({"pit-serve.service": SERVE}, "pit-serve.service"),
    "scrub": ({"pit-scrub.service": SCRUB, "pit-scrub.timer": SCRUB_TIMER}, "pit-scrub.timer"),
    "etcd": ({"pit-etcd.service": ETCD}, "pit-etcd.service"),
}


def etcd_argv(exe: str, state: str, name: str, client_url: str, peer_url: str,
              initial_cluster: str | None = None, token: str = "pit") -> list[str]:
    """The argv of `pit etcd start`'s member, for the unit to run in the foreground."""
    from .etcd_members import member_argv

    return member_argv(exe, state, name, client_url, peer_url, initial_cluster, token)


def _quote(arg: str) -> str:
    """One ExecStart= word: systemd's quoting (double quotes, backslash escapes), `%` doubled."""
    arg = arg.replace("%", "%%")
    if arg and not any(c in arg for c in ' \t"\'\\;$'):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'


def _check_path(key: str, v: str) -> str:
    if not isinstance(v, str) or not os.path.isabs(v) or any(c in v for c in "\n\r\0"):
        raise ConfigError(f"{key} must be an absolute path, got {v!r}")
    return os.path.normpath(v)


def render(unit: str, params: dict | None = None) -> dict[str, str]:
    """{file name: text} of one unit kind (agent, serve, scrub, etcd) with `params` over DEFAULTS."""
    if unit not in UNITS:
        raise ConfigError(f"unknown unit {unit!r} (one of {', '.join(UNITS)})")
    p = {**DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
    for k in ("pit", "agent_config", "serve_config", "repo", "state", "etcd"):
        p[k] = _check_path(k, p[k])
    words = {k: _quote(p[k]) for k in ("pit", "agent_config", "serve_config", "repo")}
    words["state"] = p["state"]
    words["state_etcd"] = _quote(os.path.join(p["state"], "etcd"))
    words["etcd_name"] = p["etcd_name"]
    if unit == "etcd":
        argv = etcd_argv(p["etcd"], p["state"], p["etcd_name"], p["etcd_client"], p["etcd_peer"],
                         p["etcd_initial_cluster"])
        words["etcd_argv"] = " ".join(_quote(a) for a in argv)
    files, _ = UNITS[unit]
    return {name: text.format(**words) for name, text in files.items()}


def systemd_running() -> bool:
    """sd_booted(3): systemd is PID 1 here."""
    return os.path.isdir("/run/systemd/system")


def default_pit() -> str:
    """The `pit` being run (a venv's, /usr/local/bin's ...), as an absolute path."""
    here = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "pit")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("pit")
    return os.path.abspath(found) if found else DEFAULTS["pit"]


def install(root: str, units: list[str], params: dict, enable: bool = True, echo=print,
            live: bool | None = None) -> dict:
    """Write the units under ROOT/etc/systemd/system; reload and enable them when systemd runs here
    (and ROOT is /), else say so and print the commands. `live` overrides that test (tests run a fake
    systemctl). Returns what was written and the commands run."""
    out_dir = os.path.join(root, UNIT_DIR)
    os.makedirs(out_dir, mode=0o755, exist_ok=True)
    written, enables = [], []
    for u in dict.fromkeys(units):
        rendered = render(u, params)
        main = UNITS[u][1]
        for name, text in rendered.items():
            path = os.path.join(out_dir, name)
            try:
                with open(path) as f:
                    same = f.read() == text
            except FileNotFoundError:
                same = None
            if not same:
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(text)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            echo(f"{'unchanged' if same else 'updated' if same is False else 'wrote'} {path}")
            written.append(path)
        enables.append(main)
    cmds = [["systemctl", "daemon-reload"]]
    if enable:
        now = [e for e in enables if e != "pit-etcd.service"]
        if now:
            cmds.append(["systemctl", "enable", "--now", *now])
        if "pit-etcd.service" in enables:  # waits for a quorum: do not block on it
            cmds.append(["systemctl", "enable", "--now", "--no-block", "pit-etcd.service"])
    ran = []
    if live is None:
        live = os.path.realpath(root) == "/" and systemd_running()
    if live:
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True)
            if r.returncode != 0:
                raise ConfigError(f"{' '.join(c)} failed ({r.returncode}): "
                                  f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ''}")
            echo(f"ran: {shlex.join(c)}")
            ran.append(c)
    else:
        why = ("systemd is not running on this machine (no /run/systemd/system)" if os.path.realpath(root) == "/"
               else f"the units were written under {root}, not this machine's /")
        echo(f"{why}; when they are in place on a systemd machine, run:")
        for c in cmds:
            echo(f"  {shlex.join(c)}")
    return {"written": written, "commands": cmds, "ran": ran}
