"""One exception hierarchy for the replicator, each class with its exit code.

`ReplError` derives from the store's `StoreError`, so the `pit` group turns
every one of them into one line and its exit code (no traceback). Codes
40-55 belong to the replicator (protocol, membership, configuration,
points), 30-39 to failover coordination (etcd, fencing), 56-69 to the
application layer of failover (`FailoverError`: templates, `pit set add`,
point hooks, image selection).
"""
from __future__ import annotations

from store.errors import StoreError


class ReplError(StoreError):
    """Base of every error the replicator raises on purpose."""

    exit_code = 40


class ProtocolError(ReplError):
    """The peer broke the replication protocol; the connection was closed."""

    exit_code = 41


class FrameTooLarge(ProtocolError):
    """A frame longer than the protocol's hard limit; the connection was closed."""

    exit_code = 42


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    exit_code = 43


class UnsafeWirePath(ProtocolError):
    """A path on the wire was absolute, contained '..' or NUL; the connection was closed."""

    exit_code = 44


class ChunkRejected(ProtocolError):
    """A received chunk does not decompress to bytes matching its id."""

    exit_code = 45


class ConnectionLost(ReplError):
    """The peer went away (closed, reset or silent past the timeout)."""

    exit_code = 46


class NotAuthorised(ReplError):
    """The peer is not a member of the cluster (or was removed)."""

    exit_code = 47


class TokenInvalid(ReplError):
    """The join token is malformed, unknown, used or expired."""

    exit_code = 48


class ClusterError(ReplError):
    """The cluster state on this node is missing or inconsistent."""

    exit_code = 49


class ClusterExists(ClusterError):
    """A cluster (or a joined node) already exists in this state directory."""

    exit_code = 50


class NotInCluster(ClusterError):
    """This state directory holds no cluster membership (run `pit cluster init` or `pit join`)."""

    exit_code = 51


class UnknownNode(ClusterError):
    """No such node in the roster."""

    exit_code = 52


class ConfigError(ReplError):
    """The agent or cluster configuration is invalid. `key`, when known, is the path of the bad key in
    the file (("failover", "ttl"), ("sets", "web", "replicas", 0)), for `pit config check` to show its line."""

    exit_code = 53

    def __init__(self, *args, key: tuple | None = None) -> None:
        super().__init__(*args)
        self.key = key


class AgentUnreachable(ReplError):
    """The local agent is not running (no control socket)."""

    exit_code = 54


class PointFailed(ReplError):
    """A consistent point could not be made on every replica in time."""

    exit_code = 55


class EtcdError(ReplError):
    """etcd could not be reached on any endpoint, or refused a request."""

    exit_code = 30


class Fenced(ReplError):
    """This node does not hold the leader key (or holds an older token): it must not act as primary."""

    exit_code = 31


class FailoverRefused(ReplError):
    """A failover or failback was asked for but its preconditions do not hold (say which)."""

    exit_code = 32


# ------------------------------------------------------------------ the application layer of failover (56-69)
# Templates, `pit set add`, point hooks and image selection.

class FailoverError(ReplError):
    """Failover could not proceed."""

    exit_code = 56


class TemplateError(FailoverError):
    """Unknown template or invalid template parameters."""

    exit_code = 57


class SetExists(FailoverError):
    """A set of that name is already in the cluster file."""

    exit_code = 58


class HookFailed(FailoverError):
    """A point hook failed; the point is marked failed."""

    exit_code = 59

    def __init__(self, *args, result=None) -> None:
        super().__init__(*args)
        self.result = result


class HookTimeout(HookFailed):
    """A point hook ran past its timeout and was killed; the point is marked failed."""

    exit_code = 60


class NoImages(FailoverError):
    """The set has no snapshots in this repository."""

    exit_code = 61


class NoGoodImage(FailoverError):
    """No image of the set passed deep verify and the application check."""

    exit_code = 62

    def __init__(self, *args, selection=None) -> None:
        super().__init__(*args)
        self.selection = selection


class PinnedImageBad(FailoverError):
    """The operator-pinned image failed deep verify or the application check."""

    exit_code = 63

    def __init__(self, *args, selection=None) -> None:
        super().__init__(*args)
        self.selection = selection


class CheckUnavailable(FailoverError):
    """The application check cannot run on this node (a tool is missing)."""

    exit_code = 64


class WalReplayFailed(FailoverError):
    """The WAL streamed to this node could not be replayed onto the promoted image (the image alone is used)."""

    exit_code = 65


FAILOVER = [FailoverError, TemplateError, SetExists, HookFailed, HookTimeout, NoImages, NoGoodImage, PinnedImageBad,
            CheckUnavailable, WalReplayFailed]

ALL = [ReplError, ProtocolError, FrameTooLarge, VersionMismatch, UnsafeWirePath, ChunkRejected,
       ConnectionLost, NotAuthorised, TokenInvalid, ClusterError, ClusterExists, NotInCluster,
       UnknownNode, ConfigError, AgentUnreachable, PointFailed, EtcdError, Fenced, FailoverRefused] + FAILOVER
