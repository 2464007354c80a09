"""failover: who is the primary master of the protected sets, and the switch.

Owns: the decision of each cycle (`decide`: a pure function from what was
observed to the one action), the controller (`controller`: gathers the
inputs and carries the action out: campaign, watch, promote, demote, the
fencing-token check a replica applies to a master), the planned hand-over
(`handover`: both sides of `pit failback`), the
split-brain guard (`fencing`: one leader key in etcd under a lease; its
revision is the fencing token), the etcd v3 JSON-gateway client (`etcd`),
image selection (`select`: the newest snapshot that deep-verifies and passes
its application check), and failure checks (`detect`: tcp/http/command/nic
probes confirmed N times).

Words: **primary**, **secondary station**, **protected set**, **leader key**,
**lease**, **fencing token**, **image**, **promotion**, **takeover hooks**,
**demote**, **failback**.

May import: stream (membership's `connect`, the protocol, for failback),
apps (takeover hooks, image checks), ops, the replicator's base and `store`.
Never the configuration loader or the agent: the controller gets its
`[failover]` table and the `agent` object (masters, replica side, state)
handed in by the agent that composes it.
"""
