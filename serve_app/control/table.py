"""The replica table: merges discovery, probes, load and failure reports into states.

Pure bookkeeping with an injected clock, so every transition is unit-testable; the
health actor owns one and does the I/O around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..replicas import DiscoveryStatus, Endpoint, ReplicaState, ReplicaView, Snapshot

MAX_REMEMBERED_MODELS = 4096


@dataclass(slots=True)
class _Row:
    endpoint: Endpoint
    learned_models: tuple[str, ...] = ()
    probe_ok: bool | None = None  # None: not probed yet
    ever_ok: bool = False
    probe_error: str = ""
    ejected_until: float | None = None
    eject_reason: str = ""
    ejections: int = 0  # consecutive ejections, for exponential backoff
    last_ejected_at: float = 0.0
    state: ReplicaState = ReplicaState.PENDING
    reason: str = ""
    since: float = field(default=0.0)

    @property
    def models(self) -> tuple[str, ...]:
        return self.endpoint.models or self.learned_models


class ReplicaTable:
    """Replica rows keyed by replica_id, with a version that moves on every visible change."""

    def __init__(
        self,
        *,
        epoch: str,
        ejection_base_s: float = 2.0,
        ejection_max_s: float = 60.0,
        configured_models: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.epoch = epoch
        self.version = 0
        self._rows: dict[str, _Row] = {}
        self._clock = clock
        self._ejection_base_s = ejection_base_s
        self._ejection_max_s = ejection_max_s
        self._known_models: dict[str, None] = dict.fromkeys(configured_models)
        self._discovery = DiscoveryStatus()
        self._snapshot: Snapshot | None = None
        self._listeners: list[Callable[[], None]] = []

    # -- change notification -------------------------------------------------------

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        self.version += 1
        self._snapshot = None
        for listener in self._listeners:
            listener()

    # -- discovery ----------------------------------------------------------------

    def upsert(self, endpoint: Endpoint) -> None:
        row = self._rows.get(endpoint.replica_id)
        if row is None:
            row = self._rows[endpoint.replica_id] = _Row(endpoint=endpoint, since=self._clock())
        elif row.endpoint == endpoint:
            return
        else:
            if row.endpoint.url != endpoint.url:
                # A new address is a new process: forget what we learnt about the old one.
                row.probe_ok, row.ever_ok, row.learned_models = None, False, ()
                row.ejected_until, row.ejections = None, 0
            row.endpoint = endpoint
        self._remember_models(row.models)
        self._recompute(row, force_change=True)

    def remove(self, replica_id: str) -> None:
        if self._rows.pop(replica_id, None) is not None:
            self._changed()

    def replace_all(self, endpoints: Iterable[Endpoint]) -> None:
        """Reconcile to exactly this set: rows missing from it are removed (no ghosts)."""
        wanted = {ep.replica_id: ep for ep in endpoints}
        for replica_id in [rid for rid in self._rows if rid not in wanted]:
            self.remove(replica_id)
        for endpoint in wanted.values():
            self.upsert(endpoint)

    def set_discovery_status(self, status: DiscoveryStatus) -> None:
        if status != self._discovery:
            self._discovery = status
            self._changed()

    @property
    def discovery(self) -> DiscoveryStatus:
        return self._discovery

    # -- probes, load and failure reports ----------------------------------------------

    def probe_result(self, replica_id: str, ok: bool, error: str = "", models: Iterable[str] | None = None) -> None:
        row = self._rows.get(replica_id)
        if row is None:
            return
        now = self._clock()
        if models is not None:
            row.learned_models = tuple(models)
            self._remember_models(row.models)
        row.probe_ok, row.probe_error = ok, error
        if ok:
            row.ever_ok = True
            if row.ejected_until is not None and now >= row.ejected_until:
                row.ejected_until, row.eject_reason = None, ""
            if row.ejections and now - row.last_ejected_at > self._ejection_max_s:
                row.ejections = 0  # healthy for long enough: forget the backoff
        elif row.ever_ok and row.ejected_until is None and row.endpoint.state is ReplicaState.READY:
            # It answered before and now fails: eject rather than wait for traffic to find out.
            # An ejected replica stays ejected without a longer backoff, so one that comes
            # back is readmitted at the first good probe after its current backoff.
            self._eject(row, f"health probe failed: {error}", now)
        self._recompute(row)

    def report_failure(self, replica_id: str, reason: str) -> None:
        """A passive health report from an ingress replica: take it out of rotation now."""
        row = self._rows.get(replica_id)
        if row is None or row.state is ReplicaState.DRAINING:
            return
        now = self._clock()
        if row.ejected_until is not None and now < row.ejected_until:
            return  # already out; don't stretch the backoff on a burst of reports
        self._eject(row, reason, now)
        self._recompute(row)

    def _eject(self, row: _Row, reason: str, now: float) -> None:
        row.ejections += 1
        backoff = min(self._ejection_base_s * 2 ** (row.ejections - 1), self._ejection_max_s)
        row.ejected_until = now + backoff
        row.last_ejected_at = now
        row.eject_reason = reason
        row.probe_ok = False

    # -- state ----------------------------------------------------------------------

    def _recompute(self, row: _Row, force_change: bool = False) -> None:
        state, reason = self._state_of(row)
        if (state, reason) != (row.state, row.reason):
            if state is not row.state:
                row.since = self._clock()
            row.state, row.reason = state, reason
            force_change = True
        if force_change:
            self._changed()

    @staticmethod
    def _state_of(row: _Row) -> tuple[ReplicaState, str]:
        endpoint = row.endpoint
        if endpoint.state is not ReplicaState.READY:
            return endpoint.state, endpoint.reason
        if row.ejected_until is not None:
            return ReplicaState.EJECTED, row.eject_reason
        if not row.probe_ok:
            if row.probe_ok is None:
                return ReplicaState.PENDING, "waiting for the first health probe"
            return ReplicaState.PENDING, f"not answering yet: {row.probe_error}"
        if not row.models:
            return ReplicaState.PENDING, "served models not known yet"
        return ReplicaState.READY, ""

    def _remember_models(self, models: Iterable[str]) -> None:
        for model in models:
            if model not in self._known_models and len(self._known_models) < MAX_REMEMBERED_MODELS:
                self._known_models[model] = None

    # -- reading ----------------------------------------------------------------------

    def replica_ids(self) -> list[str]:
        return list(self._rows)

    def endpoint(self, replica_id: str) -> Endpoint | None:
        row = self._rows.get(replica_id)
        return row.endpoint if row else None

    def awaiting_first_probe(self) -> bool:
        """Is any replica the source calls READY still unprobed? Then probe it now, not next round."""
        return any(
            row.probe_ok is None and row.endpoint.url and row.endpoint.state is ReplicaState.READY
            for row in self._rows.values()
        )

    def needs_models(self, replica_id: str) -> bool:
        row = self._rows.get(replica_id)
        return row is not None and not row.models

    def due_for_readmission(self, replica_id: str) -> bool:
        row = self._rows.get(replica_id)
        return row is not None and row.ejected_until is not None and self._clock() >= row.ejected_until

    def state(self, replica_id: str) -> ReplicaState | None:
        row = self._rows.get(replica_id)
        return row.state if row else None

    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            views = tuple(
                ReplicaView(
                    replica_id=rid,
                    url=row.endpoint.url,
                    models=row.models,
                    state=row.state,
                    reason=row.reason,
                    since=row.since,
                    source=row.endpoint.source,
                )
                for rid, row in sorted(self._rows.items())
            )
            self._snapshot = Snapshot(
                epoch=self.epoch,
                version=self.version,
                replicas=views,
                known_models=tuple(self._known_models),
                discovery=self._discovery,
                created=self._clock(),
            )
        return self._snapshot
