"""apps: the applications a set protects (PostgreSQL, SQLite, MySQL/MariaDB, a web site).

Owns: application templates (`templates`: a set's paths, its point hooks and
its image check, written into the cluster file's `[sets.NAME.app]`), and the
hooks run around a consistent point (`hooks`: `pre`/`post`, builtins, marking
a point failed on its snapshot).

Words: **template**, **app table** (`[sets.NAME.app]`), **point hook**
(`pre`, `post`, `builtin:NAME`), **image check** (does the application start
from a materialised snapshot?).

May import: the replicator's base (`replicator.errors`, `replicator.waiting`)
and `store`. Nothing about streaming, failover or the agent: replication
(stream/) calls into apps, never the other way round.
"""
