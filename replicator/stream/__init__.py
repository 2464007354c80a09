"""stream: replication proper, from a master's sources to its replicas' repositories.

Owns: the wire (`protocol`: frames, schemas, HELLO, heartbeats), the
cluster's identities and mTLS links (`membership`: CA, join tokens, roster,
`connect`), the digest both sides compare (`merkle`), change detection
(`watcher`), the master side of a
set (`master`: the set's loop; `tree`: its in-memory Merkle tree; `scan`:
looking at the sources; `filescache`: the tree kept across restarts;
`chunklist`: chunk lists and their deltas; `readers`: files cut, hashed
and compressed in worker processes; `payloads`: compressed chunk bytes
shared by every sender), one sender per replica (`sender`: the path
queue, points and sessions; `changes`: a batch of paths as OFFER/CHUNKS/
OPS/CHANGES frames; `catchup`: the Merkle comparison after a (re)connect),
and the replica side (`replica`: verify, commit, points, delete breaker).

Words: **set**, **master**, **replica**, **sender**, **head**, **batch**,
**consistent point**, **catch-up**, **files cache**, **delta** (keep/new
ranges of a chunk list against its **base**), **mirror**/**archive** mode.

May import: ops (the replica records metrics), apps (a replica marks a
point's hook outcome on its snapshot), the replicator's base (`errors`,
`waiting`, `names`, `schedule`, and `settings`, whose typed `SetConfig` each
set is given) and `store`. Never the configuration loader (`replicator.config`),
failover/, the agent or the commands: what the master needs of its node it
gets from the `agent` object handed to it (its state, roster, fencing token).
"""
