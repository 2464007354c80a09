"""replicator: change detection, the replication protocol, master and replica agents (not built yet)."""
