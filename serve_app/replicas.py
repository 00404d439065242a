"""Replica states and the versioned snapshot the health actor publishes.

These are plain, picklable values: the actor builds them, Ray ships them to every
ingress replica, and the request path only reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ReplicaState(str, enum.Enum):
    PENDING = "PENDING"  # exists, not ready yet (starting, not Ready, no IP, not answering)
    READY = "READY"  # gets new requests
    DRAINING = "DRAINING"  # terminating: no new requests, in-flight ones finish
    EJECTED = "EJECTED"  # health says it fails; retried after a backoff


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a discovery source knows about one replica."""

    replica_id: str
    url: str
    models: tuple[str, ...] = ()  # empty: learn them from the replica's /v1/models
    state: ReplicaState = ReplicaState.READY  # READY, PENDING or DRAINING as the source sees it
    reason: str = ""
    source: str = "static"  # e.g. "static" or "pod ns/name"


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One row of the replica table as published to ingress replicas."""

    replica_id: str
    url: str
    models: tuple[str, ...]
    state: ReplicaState
    reason: str
    since: float  # wall-clock time the state was entered
    source: str
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0

    def as_dict(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "url": self.url,
            "models": list(self.models),
            "state": self.state.value,
            "reason": self.reason,
            "since": self.since,
            "source": self.source,
            "running": self.running,
            "waiting": self.waiting,
            "kv_cache_usage": self.kv_cache_usage,
        }


@dataclass(frozen=True, slots=True)
class DiscoveryStatus:
    """Whether the discovery source's view is current, and if not since when."""

    synced: bool = False  # the first full listing has been applied
    stale_since: float | None = None  # set while the source cannot reach its backend
    message: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A versioned, immutable view of every replica.

    `epoch` changes whenever the actor restarts, so a poller holding a version from an
    older actor knows to take the new snapshot whatever its number.
    """

    epoch: str
    version: int
    replicas: tuple[ReplicaView, ...]
    known_models: tuple[str, ...]
    discovery: DiscoveryStatus = field(default_factory=DiscoveryStatus)
    created: float = 0.0
