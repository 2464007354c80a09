"""commands: the replicator's `pit` commands (click), registered through the `pit.commands` entry points.

Owns: cluster membership and the running node (`cluster`: `pit cluster`,
`join`, `agent`, `point`, `status`, `release-deletes`, `failback`, `etcd`),
failover and sets (`failover`: `pit failover`, `pit set`), and operating
commands (`ops`: `pit config check`, `pit install-service`). `pit demo` is
ops/demo.py's own group.

Words: those of the rooms below; a command parses options, calls one of
them and prints (text or `--json`). Every `ReplError` is a `StoreError`, so
the `pit` group prints it as one line and exits with its code.

May import: everything in the replicator (the agent, config, failover,
stream, ops, apps, base) and `store`. Nothing imports the commands but the
entry points (pyproject.toml).
"""
