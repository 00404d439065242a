"""An ingress replica's own copy of the replica table, indexed for the request path.

Each published snapshot is indexed once (READY replicas per model, sorted), so a
request costs a dict lookup plus one `Candidate` per replica carrying this ingress's
in-flight count: routing policies get their load as data, not by reaching into the
forwarding layer's tracker. Failures this ingress sees itself take a replica out of
its own choices at once, before the actor's ejection comes back in the next snapshot.

A view is trusted once its discovery has listed (`synced`). A snapshot that has not is
empty (a health actor restarted while Kubernetes is unreachable); it never replaces a
synced view, which is kept and marked stale with the new actor's reason instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from routers import Candidate

from ..replicas import DiscoveryStatus, LoadSample, LoadUpdate, ReplicaState, ReplicaView, Snapshot


def _nothing_in_flight(replica_id: str) -> int:
    return 0


class LocalView:
    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.snapshot: Snapshot | None = None
        self.loads: dict[str, LoadSample] = {}
        self.loads_version: tuple[str, int] | None = None
        self._scraped_inflight: dict[str, int] = {}  # this replica's in-flight count when each sample arrived
        self._wall = wall
        self.received_at: float | None = None  # wall clock, for the replica table
        self._ready: dict[str, tuple[ReplicaView, ...]] = {}
        self._coming: frozenset[str] = frozenset()  # models with a PENDING replica
        self._known: frozenset[str] = frozenset()
        self._ejected_until: dict[str, float] = {}
        self._clock = clock
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout_s: float) -> bool:
        """Wait (without polling) until the next snapshot arrives; False on timeout."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=max(timeout_s, 0.0))
            return True
        except TimeoutError:
            return False

    def apply(self, snapshot: Snapshot) -> bool:
        """Take a newer snapshot; False if it was refused (unsynced, while this view is synced)."""
        current = self.snapshot
        if not snapshot.discovery.synced and current is not None and current.discovery.synced:
            new = snapshot.discovery
            stale_since = current.discovery.stale_since or new.stale_since or self._wall()
            message = f"a new health actor has not listed replicas yet ({new.message or 'no listing'}); keeping the last synced view"
            self.snapshot = dataclasses.replace(
                current, discovery=DiscoveryStatus(synced=True, stale_since=stale_since, message=message)
            )
            return False
        ready: dict[str, list[ReplicaView]] = {}
        coming: set[str] = set()
        for view in snapshot.replicas:  # already sorted by replica_id
            if view.state is ReplicaState.READY:
                for model in view.models:
                    ready.setdefault(model, []).append(view)
            elif view.state is ReplicaState.PENDING:
                coming.update(view.models)
        self._ready = {model: tuple(cands) for model, cands in ready.items()}
        self._coming = frozenset(coming)
        self._known = frozenset(snapshot.known_models)
        live = {view.replica_id for view in snapshot.replicas}
        self._ejected_until = {rid: t for rid, t in self._ejected_until.items() if rid in live}
        self.snapshot = snapshot
        self.received_at = time.time()
        self._changed.set()  # wake everything waiting for this snapshot
        self._changed = asyncio.Event()
        return True

    @property
    def has_snapshot(self) -> bool:
        return self.snapshot is not None

    def is_known(self, model: str) -> bool:
        return model in self._known or model in self._ready

    def discovery_doubt(self) -> tuple[str, str] | None:
        """(code, why) when a model missing from this view may exist all the same; else None.

        Discovery that never listed or lost its backend cannot tell "no such model" from
        "not seen yet": the answer is then a retryable 503, never a 404.
        """
        status = self.snapshot.discovery if self.snapshot is not None else None
        if status is None or not status.synced:
            why = status.message if status is not None and status.message else "no listing yet"
            return "discovery_not_synced", f"replica discovery has not synced yet: {why}"
        if status.stale_since is not None:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(status.stale_since))
            return "discovery_stale", f"replica discovery is stale since {since}: {status.message}"
        return None

    def has_coming(self, model: str) -> bool:
        return model in self._coming

    def apply_loads(self, update: LoadUpdate, inflight: Callable[[str], int] = _nothing_in_flight) -> None:
        """New load samples; remember this replica's in-flight count as each one arrives,
        so what it starts or finishes afterwards is counted once (``routers.load``)."""
        previous = self.loads
        scraped_inflight = {}
        for replica_id, sample in update.samples.items():
            old = previous.get(replica_id)
            if old is not None and old.scraped_at == sample.scraped_at:
                scraped_inflight[replica_id] = self._scraped_inflight.get(replica_id, 0)
            else:
                scraped_inflight[replica_id] = inflight(replica_id)
        self.loads = update.samples
        self._scraped_inflight = scraped_inflight
        self.loads_version = (update.epoch, update.version)

    def candidates(self, model: str, inflight: Callable[[str], int] = _nothing_in_flight) -> list[Candidate]:
        """READY replicas of ``model`` not ejected here, with their load as data for routers."""
        views = self._ready.get(model, ())
        if self._ejected_until:
            now = self._clock()
            views = [v for v in views if self._ejected_until.get(v.replica_id, 0.0) <= now]
        loads = self.loads
        wall = self._wall()
        out = []
        for v in views:
            rid = v.replica_id
            s = loads.get(rid)
            if s is None:
                out.append(Candidate(rid, v.url, inflight=inflight(rid)))
            else:
                out.append(Candidate(
                    rid, v.url, s.running, s.waiting, s.kv_cache_usage, inflight(rid),
                    max(0.0, wall - s.scraped_at), self._scraped_inflight.get(rid, 0), s.slots, s.cache_tokens,
                ))
        return out

    def eject_locally(self, replica_id: str, seconds: float) -> None:
        self._ejected_until[replica_id] = self._clock() + seconds

    def clear_local_ejection(self, replica_id: str) -> None:
        self._ejected_until.pop(replica_id, None)

    def ready_models(self) -> list[str]:
        return sorted(model for model, cands in self._ready.items() if cands)

    def ready_replicas(self) -> list[tuple[str, str]]:
        """(replica_id, url) of every READY replica, whatever its models."""
        if self.snapshot is None:
            return []
        return [(v.replica_id, v.url) for v in self.snapshot.replicas if v.state is ReplicaState.READY]

    def replica_ids(self) -> list[str]:
        return [view.replica_id for view in self.snapshot.replicas] if self.snapshot else []
