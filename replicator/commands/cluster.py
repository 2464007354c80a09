"""Cluster and node commands of `pit` (registered through the `pit.commands` entry points):
`pit cluster init|token|remove|nodes|secondary`, `pit join`, `pit agent`, `pit point`,
`pit status`, `pit release-deletes`, `pit failback` and `pit etcd start|stop|status`.

Every `ReplError` is a `StoreError`, so the `pit` group prints it as one
line and exits with its code.
"""
from __future__ import annotations

import json
import os
import socket

import click

from .. import repos
from ..errors import ClusterExists, ConfigError

STATE = click.option("--state", "state", envvar="PIT_STATE", required=True, metavar="DIR",
                     help="The node's state directory (or set PIT_STATE).")


@click.group()
def cluster():
    """Cluster membership on the primary master: init, tokens, roster."""


AGENT_CONFIG = click.option(
    "--agent-config", default=None, metavar="FILE",
    help="Also write this node's agent configuration to FILE (e.g. /etc/pit/agent.toml, what `pit install-service` "
         "and `pit status` use): creates its directory; a different file already there is refused unless --force.")
METRICS = click.option("--metrics", default=None, metavar="HOST:PORT",
                       help="With --agent-config: the agent serves Prometheus metrics there (the file's `metrics`).")
FORCE = click.option("--force", is_flag=True, help="With --agent-config: replace a different file at FILE.")


def _needs_agent_config(agent_config, **given) -> None:
    for opt, v in given.items():
        if v and not agent_config:
            raise ConfigError(f"--{opt.replace('_', '-')} goes into the agent configuration: give --agent-config FILE "
                              "too")
    if given.get("metrics"):
        from ..ops.metrics import validate_metrics_address

        try:
            validate_metrics_address(given["metrics"])
        except ConfigError as exc:
            raise ConfigError(f"--metrics{str(exc).removeprefix('`metrics`')}") from None


def _wrote(plan: dict, done: str) -> None:
    keys = ", ".join(ln.split(" = ")[0] for ln in plan["text"].splitlines() if not ln.startswith("#"))
    if done == "unchanged":
        click.echo(f"agent configuration {plan['path']} already says this ({keys}): left as it is")
    else:
        click.echo(f"{done} agent configuration {plan['path']} ({keys})")


def REPO_STORAGE(f):
    """Where the --repo to create keeps its packs, and its encryption (pit cluster init, pit join)."""
    for opt in reversed([
        click.option("--backend", "backend", default=None, metavar="s3://BUCKET/PREFIX",
                     help="With --repo: keep that repository's packs in an S3-compatible bucket (docs/store.md); "
                          "with --agent-config, the file's `backend`."),
        click.option("--s3-endpoint", default=None, metavar="URL", help="The S3 endpoint of --backend."),
        click.option("--key-file", "repo_key_file", default=None, metavar="FILE",
                     help="With --repo: encrypt that repository with this key file (made when absent; the agent "
                          "file's `key_file`). Required with --backend unless --no-encrypt."),
        click.option("--no-encrypt", "no_encrypt", is_flag=True,
                     help="With --backend: store the packs in the bucket in the clear (the agent file's "
                          "`encrypt = false`)."),
    ]):
        f = opt(f)
    return f


@cluster.command("init")
@STATE
@click.option("--node", default=None, help="This node's id (default: the host name).")
@click.option("--address", required=True, metavar="HOST:PORT", help="Where this node's agent listens (mTLS).")
@click.option("--join-address", default=None, metavar="HOST:PORT", help="Where joining nodes connect (default: port+1).")
@click.option("--repo", default=None, metavar="DIR",
              help="The repository this node receives into once another node has led (rejoin and `pit failback` "
                   "need it): created when absent; with --agent-config, the file's `repo`.")
@REPO_STORAGE
@AGENT_CONFIG
@click.option("--cluster", "cluster_file", default=None, metavar="FILE",
              help="With --agent-config: the cluster file the primary's agent reads (the file's `cluster`; "
                   "default: cluster.toml beside the agent configuration).")
@METRICS
@FORCE
def cluster_init(state, node, address, join_address, repo, backend, s3_endpoint, repo_key_file, no_encrypt,
                 agent_config, cluster_file, metrics, force):
    """Create the cluster CA and this primary's certificate; with --repo, the repository it rejoins into after
    a failover; with --agent-config, also its agent configuration (state, repo, cluster file, metrics)."""
    from ..config import plan_agent_config, write_agent_config
    from ..names import check_node_id, parse_address
    from ..stream.membership import ca_fingerprint, init_cluster

    node = node or socket.gethostname().split(".")[0].lower()
    encrypt = _backend_needs_repo(repo, backend, s3_endpoint, repo_key_file, no_encrypt)
    _needs_agent_config(agent_config, cluster=cluster_file, metrics=metrics, force=force)
    if os.path.exists(os.path.join(state, "node.json")):
        raise ClusterExists(f"{os.path.abspath(state)} already holds a cluster membership")
    plan = None
    if agent_config:
        check_node_id(node)
        parse_address(address)
        cfile = cluster_file or os.path.join(os.path.dirname(os.path.abspath(agent_config)), "cluster.toml")
        plan = plan_agent_config(agent_config, {"state": os.path.abspath(state),
                                                "repo": os.path.abspath(repo) if repo else None,
                                                "backend": backend, "s3_endpoint": s3_endpoint,
                                                "key_file": os.path.abspath(repo_key_file) if repo_key_file else None,
                                                "encrypt": encrypt,
                                                "cluster": os.path.abspath(cfile), "metrics": metrics},
                                 "pit cluster init", force)
    if repo:
        click.echo(repos.ensure(repo, backend, s3_endpoint, repo_key_file, encrypt))
    st = init_cluster(state, node, address, join_address)
    click.echo(f"cluster created: primary {st.node} at {address}, joins at {st.info['join_address']}")
    click.echo(f"CA fingerprint sha256:{ca_fingerprint(st)}")
    if plan:
        _wrote(plan, write_agent_config(plan))


@cluster.command("token")
@STATE
@click.option("--ttl", default=24 * 3600, show_default=True, type=int, help="Seconds the token stays valid.")
@click.option("--uses", default=1, show_default=True, type=int, help="How many nodes may join with it (one join each).")
@click.option("--nodes", default=None, metavar="N1,N2", help="Only these node ids may join with it, each once.")
def cluster_token(state, ttl, uses, nodes):
    """Print a join token (address, secret, CA fingerprint, expiry), good for one join,
    or one per joining node with --uses N or --nodes b,c."""
    from ..stream.membership import NodeState, make_token

    names = [n.strip() for n in nodes.split(",") if n.strip()] if nodes is not None else None
    click.echo(make_token(NodeState(state), ttl, uses=uses, nodes=names))


@cluster.command("remove")
@STATE
@click.argument("node")
def cluster_remove(state, node):
    """Remove NODE from the roster: its connections are refused at once."""
    from ..stream.membership import NodeState, remove_node

    remove_node(NodeState(state), node)
    click.echo(f"removed {node}")


@cluster.command("nodes")
@STATE
@click.option("--json", "as_json", is_flag=True)
def cluster_nodes(state, as_json):
    """List the roster."""
    from ..stream.membership import NodeState

    r = NodeState(state).roster()
    if as_json:
        click.echo(json.dumps(r, indent=2, sort_keys=True))
        return
    for node, ent in sorted(r.items()):
        click.echo(f"{node}\t{ent['address']}\tsha256:{ent['fp'][:16]}")


@cluster.command("secondary")
@click.argument("node")
@click.option("--cluster", "cluster_file", envvar="PIT_CLUSTER", default="/etc/pit/cluster.toml", show_default=True,
              type=click.Path(dir_okay=False), help="The primary's cluster file.")
def cluster_secondary(node, cluster_file):
    """Make NODE the secondary station (live: pushed to every node at once; NODE starts keeping its live
    mirror from its own repository, so its first promotion is a delta too)."""
    from ..config import load_cluster, set_failover_secondary

    before = load_cluster(cluster_file).failover
    set_failover_secondary(cluster_file, node)
    click.echo(f"secondary station: {before.secondary} -> {node} (the running primary pushes it now)")


def _backend_needs_repo(repo, backend, s3_endpoint, key_file, no_encrypt) -> bool | None:
    """--backend, --s3-endpoint, --key-file and --no-encrypt describe the --repo to create: refused without
    it, and a bad URL or a bucket without encryption said either way is refused before anything changes.
    -> the agent file's `encrypt` (False when refused, else None: the key file says)."""
    if (backend or s3_endpoint or key_file or no_encrypt) and not repo:
        raise click.UsageError("--backend, --s3-endpoint, --key-file and --no-encrypt need --repo DIR (the "
                               "repository they describe)")
    if s3_endpoint and not backend:
        raise click.UsageError("--s3-endpoint needs --backend s3://BUCKET/PREFIX")
    if backend:
        from store.s3backend import S3Location

        S3Location.parse(backend, s3_endpoint)
    encrypt = False if no_encrypt else None
    if repo and not os.path.exists(os.path.join(repo, "config")):
        repos.wants_encryption(backend, key_file, encrypt)
    return encrypt


@click.command("join")
@STATE
@click.argument("token")
@click.option("--node", default=None, help="This node's id (default: the host name).")
@click.option("--address", required=True, metavar="HOST:PORT", help="Where this node's agent will listen.")
@click.option("--repo", default=None, metavar="DIR",
              help="The repository this node keeps its replicas in: created when absent (as `pit --repo DIR "
                   "init`); with --agent-config, the file's `repo`.")
@REPO_STORAGE
@AGENT_CONFIG
@METRICS
@FORCE
def join(state, token, node, address, repo, backend, s3_endpoint, repo_key_file, no_encrypt, agent_config, metrics,
         force):
    """Join the cluster named by TOKEN (from `pit cluster token`); with --repo and --agent-config, also make
    the node's repository and write its agent configuration."""
    from ..names import check_node_id, parse_address
    from ..stream.membership import join as do_join, parse_token

    node = node or socket.gethostname().split(".")[0].lower()
    encrypt = _backend_needs_repo(repo, backend, s3_endpoint, repo_key_file, no_encrypt)
    _needs_agent_config(agent_config, metrics=metrics, force=force)
    # everything that can be checked here is, before the join spends a use of the token
    check_node_id(node)
    parse_address(address)
    parse_token(token)
    if os.path.exists(os.path.join(state, "node.json")):
        raise ClusterExists(f"{os.path.abspath(state)} already holds a cluster membership")
    plan = None
    if agent_config:
        from ..config import plan_agent_config

        plan = plan_agent_config(agent_config, {"state": os.path.abspath(state),
                                                "repo": os.path.abspath(repo) if repo else None,
                                                "backend": backend, "s3_endpoint": s3_endpoint,
                                                "key_file": os.path.abspath(repo_key_file) if repo_key_file else None,
                                                "encrypt": encrypt,
                                                "metrics": metrics}, "pit join", force)
    if repo:
        click.echo(repos.ensure(repo, backend, s3_endpoint, repo_key_file, encrypt))
    st = do_join(token, state, node, address)
    click.echo(f"joined as {st.node}; primary is {st.primary}")
    if plan:
        from ..config import write_agent_config

        _wrote(plan, write_agent_config(plan))


@click.command("agent")
@click.option("--config", "config", required=True, metavar="FILE", help="The agent's TOML file.")
def agent(config):
    """Run this node: watch and send the sets it masters, receive those it replicates."""
    from ..agent import run_agent

    run_agent(config)


CTL = [click.option("--config", "config", default=None, metavar="FILE", help="The agent's TOML file."),
       click.option("--state", "state", envvar="PIT_STATE", default=None, metavar="DIR")]


def _ctl(f):
    for opt in reversed(CTL):
        f = opt(f)
    return f


@click.command("point")
@_ctl
@click.option("--set", "set_name", required=True, help="The replication set.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for every replica.")
def point(config, state, set_name, timeout):
    """Make a consistent point (a snapshot on every replica) now."""
    from ..agent import control_request

    res = control_request(state, config, "point", {"set": set_name, "timeout": timeout}, timeout + 30)
    for node, r in sorted(res.items()):
        click.echo(f"{node}\t{r['snapshot']}" if "snapshot" in r else f"{node}\tskipped: {r.get('skipped')}")


@click.command("status")
@_ctl
@click.option("--json", "as_json", is_flag=True, help="Every node's status as JSON.")
@click.option("--local", is_flag=True, help="Only this agent's own status (JSON), without asking the others.")
def status(config, state, as_json, local):
    """Every node of the cluster: role, link, lag, last point and snapshot per set, verification,
    the fencing token holder, open alerts."""
    from ..agent import control_request

    if local:
        click.echo(json.dumps(control_request(state, config, "status", {}), indent=2, sort_keys=True))
        return
    st = control_request(state, config, "cluster-status", {})
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    click.echo(f"primary master: {st['leader']}" + (f" (fencing token {st['token']})" if st["token"] else "")
               + f"; asked from {st['asked_by']}")
    for node, n in sorted(st["nodes"].items()):
        if "error" in n:
            click.echo(f"{node:12} DOWN: {n['error']}")
            continue
        click.echo(f"{node:12} {'; '.join(n.get('roles') or ['(no role yet)'])}")
        for name, s in sorted(n.get("sets", {}).items()):
            sched = s.get("schedule")
            for r, rs in sorted((s.get("replicas") or {}).items()):
                link = "connected" if rs.get("connected") else f"DISCONNECTED ({rs.get('last_error') or '?'})"
                lag = f"{rs.get('queued', 0)} paths queued" + (", catching up" if rs.get("catchup") else "")
                if sched and not rs.get("connected") and not rs.get("last_error"):
                    # a scheduled set connects for its runs only: between them the link is idle, not broken
                    link = (f"scheduled, last run {rs.get('last_run') or 'none yet'}, "
                            f"next {sched.get('next_run') or '?'}")
                    lag = f"{rs.get('queued', 0)} paths queued"
                click.echo(f"  {name} -> {r}: {link}, {lag}, {rs.get('bytes_sent', 0)} bytes sent")
            wr = s.get("wal_replicas") or {}
            for r, w in sorted((wr.get("replicas") or {}).items()):  # the database log, from the master's view
                behind = "no slot yet" if w.get("lag_bytes") is None else f"{w['lag_bytes']} bytes behind"
                click.echo(f"  {name} -> {r}: database log " + (
                    f"streaming, {behind}, {w.get('lag_seconds', 0):.3f} s" if w.get("streaming") else
                    f"NOT STREAMING for {w.get('lag_seconds', 0):.0f} s ({behind})")
                    + (f"; commits wait for {wr['sync']}" if wr.get("sync") else ""))
            if wr.get("error"):
                click.echo(f"  {name}: database log lag unknown: {wr['error']}")
            w = s.get("wal")
            if w:  # this replica's own receiver
                click.echo(f"  {name}: receiving the database log from {w.get('master') or '?'}: "
                           + ("streaming" if w.get("running") else f"NOT RECEIVING ({w.get('error') or '?'})")
                           + f", newest {w.get('newest_segment') or '-'}"
                           + (f", archived {w['archived_at']}" if w.get("archived_at") else ""))
            cap = s.get("capture") or {}
            if s.get("role") == "master" and cap.get("mechanism") == "reflink":  # how big changed files are read
                files = cap.get("files") or {}
                ranges = sum(1 for how in files.values() if how.startswith("ranges"))
                click.echo(f"  {name}: byte-range capture (reflink): last look {ranges} file(s) by ranges, "
                           f"{len(files) - ranges} whole"
                           + "".join(f"; {os.path.basename(f)}: {how}" for f, how in list(files.items())[:3]
                                     if how.startswith("whole")))
            if s.get("role") == "replica":
                v = s.get("verified") or {}
                click.echo(f"  {name}: {s.get('snapshots', 0)} snapshots, latest {s.get('latest') or '-'}, "
                           f"verified {v.get('result', 'never')}" + (f" {v['time']}" if v.get("time") else "")
                           + (", changes pending the next point" if s.get("head_pending") else ""))
            for a in s.get("alerts") or []:
                click.echo(f"  ALERT {name}: {a}")
        fo = n.get("failover") or {}
        if fo.get("note"):
            click.echo(f"  note: {fo['note']}")
        for c in (fo.get("checks") or []) + (fo.get("link") or []):
            if not c.get("ok"):
                click.echo(f"  check failing: {c['check']}: {c['detail']} ({c['failures']} in a row)")


@click.command("release-deletes")
@_ctl
@click.option("--set", "set_name", required=True)
def release_deletes(config, state, set_name):
    """Let deletions held by the mass-delete breaker through (on the replica)."""
    from ..agent import control_request

    control_request(state, config, "release-deletes", {"set": set_name})
    click.echo(f"deletions released for {set_name}; the master resends them on reconnect")


def _show_takeover(rep: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rep, indent=2, sort_keys=True))
        return
    click.echo(f"{rep['node']} is the primary master (fencing token {rep['token']}) after {rep['seconds']} s: "
               f"{rep['reason']}")
    for name, s in sorted(rep["sets"].items()):
        if "error" in s:
            click.echo(f"  set {name}: NOT PROMOTED: {s['error']}")
            continue
        m = s["materialised"]
        click.echo(f"  set {name}: image {s['snapshot']} ({s['time']}); {m['files_written']} files written, "
                   f"{m['files_unchanged']} unchanged, {m['removed']} removed")
        for sk in s["skipped"]:
            click.echo(f"    skipped {sk['snapshot']}: {sk['reason']}")
    for h in rep.get("takeover_hooks", []):
        click.echo(f"  takeover hook {h.get('hook')}: {'ok' if h.get('ok') else 'FAILED: ' + str(h.get('error'))}")


@click.command("failback")
@_ctl
@click.option("--json", "as_json", is_flag=True)
def failback(config, state, as_json):
    """On the returning old primary: freeze the current primary, take its final point, switch back."""
    from ..agent import control_request

    _show_takeover(control_request(state, config, "failback", {}, 600), as_json)


@click.group("etcd")
def etcd():
    """Run the etcd members failover uses (three on three nodes; one for a demo)."""


@etcd.command("start")
@STATE
@click.option("--name", required=True, help="This member's name (e.g. the node id).")
@click.option("--client", "client_url", required=True, metavar="URL", help="e.g. http://10.0.0.1:2379")
@click.option("--peer", "peer_url", required=True, metavar="URL", help="e.g. http://10.0.0.1:2380")
@click.option("--initial-cluster", default=None, metavar="N1=URL,N2=URL,N3=URL",
              help="Every member's peer URL (default: this member alone).")
def etcd_start(state, name, client_url, peer_url, initial_cluster):
    """Start this node's etcd member in the background (--pre-vote always)."""
    from ..ops.etcd_members import start

    r = start(state, name, client_url, peer_url, initial_cluster)
    if not r["started"]:
        click.echo(f"etcd member {name} already runs (pid {r['pid']})")
    elif r["healthy"]:
        click.echo(f"etcd member {name} healthy at {client_url} (pid {r['pid']})")
    else:
        click.echo(f"etcd member {name} started (pid {r['pid']}); healthy once a quorum of members runs")


@etcd.command("stop")
@STATE
def etcd_stop(state):
    """Stop this node's etcd member."""
    from ..ops.etcd_members import stop

    click.echo("etcd member stopped" if stop(state) else "no etcd member runs for this state directory")


@etcd.command("status")
@click.argument("endpoints", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def etcd_status(endpoints, as_json):
    """Health of each etcd endpoint; exits 30 when any is unhealthy."""
    from ..errors import EtcdError
    from ..ops.etcd_members import health

    out = {e: dict(zip(("healthy", "detail"), health(e))) for e in endpoints}
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        for e, h in out.items():
            click.echo(f"{e}\t{'healthy' if h['healthy'] else 'UNHEALTHY: ' + h['detail']}")
    if not all(h["healthy"] for h in out.values()):
        raise EtcdError(f"{sum(not h['healthy'] for h in out.values())} of {len(out)} etcd endpoints unhealthy")
