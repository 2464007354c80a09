"""ops: running a node for an operator, beside replication itself.

Owns: Prometheus metrics read from the agent's status (`metrics`: the
collector, the process-wide `observe`/`timed`/`inc` registry), alerts that
reach a person (`alerts`: command and mail, the status watcher), systemd
units and `pit install-service`'s work (`service`), a local etcd member for
the cluster's coordination (`etcd_members`: `pit etcd start|stop|status`;
the etcd *client* is failover's), and the one-machine cluster demo (`demo`:
the `pit demo` click group).

Words: **metric**, **alert** (kind, key, severity, resolved), **unit**,
**etcd member**, **demo**.

May import: apps (the demo writes its sets through the templates), the
replicator's base (`errors`, `waiting`) and `store`. Metrics and alerts read
the agent's status as a plain dict handed in (an `agent` object with
`status()`), so they never import stream/, failover/ or the agent.
"""
