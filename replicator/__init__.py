"""replicator: change detection, the replication protocol, master and replica agents, cluster membership.

Words (docs/replication.md):

- **node**: one `pit agent`, named by the node id in its certificate;
  the **primary** also holds the cluster CA, the roster and the sets file.
- **set**: source paths on one **master**, streamed to its **replicas**.
- **head**: what a replica has received for a set and not yet made a
  snapshot; a **consistent point** turns it into a snapshot.
- **catch-up**: after any (re)connect, master and replica compare Merkle
  digests level by level and only differing subtrees travel.

Modules, bottom up: `errors` (one hierarchy, exit codes), `protocol`
(frames, schemas, heartbeats), `membership` (CA, tokens, join, roster, TLS),
`config` (agent and cluster files, versioned push), `merkle` (the digest
both sides compare), `watcher` (watchdog events), `master` (tree, scan,
senders), `replica` (verify, commit, points, delete breaker), `agent`
(a running node) and `cli` (the `pit` commands).
"""
