"""replicator: continuous replication of sets from masters to replicas, failover, and running a node.

Words (docs/replication.md, docs/failover.md):

- **node**: one `pit agent`, named by the node id in its certificate;
  the **primary** also holds the cluster CA, the roster and the sets file.
- **set**: source paths on one **master**, streamed to its **replicas**.
- **head**: what a replica has received for a set and not yet made a
  snapshot; a **consistent point** turns it into a snapshot.
- **catch-up**: after any (re)connect, master and replica compare Merkle
  digests level by level and only differing subtrees travel.
- **failover**: the **secondary station** takes over the protected sets
  when the primary fails, guarded by a leader key in etcd.

Rooms, bottom up; each may import only the rooms below it (and `store`),
never one above, and no two modules import each other (docs/architecture.md):

1. base: `errors` (one hierarchy, exit codes), `waiting` (polling), `names`
   (node ids, addresses), `schedule` (when a scheduled set runs),
   `settings` (the typed configuration model: every key, its default).
2. `apps/`: application templates and point hooks.
3. `ops/`: metrics, alerts, systemd units, a local etcd member, `pit demo`.
4. `stream/`: replication proper: the wire, membership, the master's tree
   and senders, the replica side.
5. `failover/`: the controller, fencing, the etcd client, image selection,
   failure checks.
6. `config`: loading the agent and cluster files into `settings`' types;
   versions and the pushed configuration.
7. `agent`: a running node, the one place that composes stream, failover
   and ops.
8. `commands/`: the `pit` commands (click), registered through the
   `pit.commands` entry points.

Package `__init__` modules hold only their docstring: importing one module
loads what it imports, nothing more.
"""
