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

    def as_dict(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "url": self.url,
            "models": list(self.models),
            "state": self.state.value,
            "reason": self.reason,
            "since": self.since,
            "source": self.source,
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


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One replica's load as last scraped, published apart from the snapshot.

    Loads change many times a second; shipping them with the replica table would
    republish every URL, model and reason at that rate.
    """

    running: int
    waiting: int
    kv_cache_usage: float
    scraped_at: float  # wall clock: ingress replicas on other nodes compute the age
    slots: int | None = None  # running slots, once the replica was seen saturated
    cache_tokens: int | None = None  # KV cache size in tokens, when the replica says


@dataclass(frozen=True, slots=True)
class LoadUpdate:
    """Every replica's latest load sample; `version` grows with each scrape round."""

    epoch: str
    version: int
    samples: dict[str, LoadSample]
