"""The replica-health actor: the single source of truth for which replicas exist and their state.

It runs as a one-replica Serve deployment, so it lives and dies with the application
and Serve restarts it if it crashes; a restarted actor rebuilds its view from the
discovery source and its own probes before it publishes anything (a fresh actor never
tells ingress replicas that everything is PENDING). A view is trusted only after the
source's first successful listing; until then, if the source fails, the actor publishes
its empty table marked unsynced, with the reason, and ingress replicas that hold a synced
view keep it (`LocalView.apply`).

Ingress replicas long-poll `snapshot_since`; nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import aiohttp
from ray import serve

from ..background import BackgroundLoops
from ..config import GatewayConfig, load_config
from ..metrics import FamilyData, MetricsAggregator, render, replica_state_metrics
from ..replicas import LoadUpdate, ReplicaState, Snapshot
from .discovery import build_source
from .load_scraper import LoadScraper
from .placements import PlacementRelay
from .prober import Prober
from .table import ReplicaTable

log = logging.getLogger("ray.serve")

LONG_POLL_TIMEOUT_S = 20.0
MODELS_REFRESH_ROUNDS = 15  # re-read /v1/models every N probe rounds
PROBE_CONCURRENCY = 64


@serve.deployment(
    name="ReplicaHealth",
    num_replicas=1,
    max_ongoing_requests=100_000,  # long-polls from every ingress replica wait here
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=2,
    health_check_timeout_s=10,
    graceful_shutdown_timeout_s=2,
    # Its calls are the ingress replicas' long-polls and reports, several a second each:
    # an access-log line per call (idle CPU measured 7.4% -> 5.6% of a core without them).
    logging_config={"enable_access_log": False},
)
class ReplicaHealth:
    async def __init__(self, config: dict[str, Any] | GatewayConfig | None = None) -> None:
        self._config = config if isinstance(config, GatewayConfig) else load_config(config)
        health = self._config.health
        self._table = ReplicaTable(
            epoch=uuid.uuid4().hex,
            ejection_base_s=health.ejection_base_s,
            ejection_max_s=health.ejection_max_s,
            configured_models=self._config.models,
        )
        self._changed = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._warm = asyncio.Event()  # set once the first full view is built
        self._table.add_listener(self._on_change)
        self._metrics = MetricsAggregator(
            retire_after_s=self._config.metrics.retire_ingress_after_s,
            replica_series_ttl_s=self._config.metrics.replica_series_ttl_s,
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=PROBE_CONCURRENCY, keepalive_timeout=4.0)
        )
        upstream_key = self._config.resolve_keys("upstream_api_key")
        self._prober = Prober(self._session, health.probe_timeout_s, upstream_key[0] if upstream_key else None)
        self._loads = LoadScraper(self._table.epoch, health.metrics_interval_s)
        self._placements = PlacementRelay()
        self._loops = BackgroundLoops()
        self._loops.start("discovery", build_source(self._config).run(self._table))
        self._loops.start("probes", self._probe_loop())
        self._loops.start("load", self._loads.run(self._ready_targets))

    def check_health(self) -> None:
        self._loops.check()

    def _on_change(self) -> None:
        self._wake_pollers()
        if self._table.awaiting_first_probe():
            self._probe_now.set()

    def _wake_pollers(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _publishable(self) -> bool:
        """Warm (the first full view is built), or the source failed before it ever listed.

        The latter is published as it is, empty and `synced=False` with the source's reason,
        so ingress replicas can tell why nothing is routable instead of hearing nothing.
        """
        status = self._table.discovery
        return self._warm.is_set() or (not status.synced and status.stale_since is not None)

    # -- the loops --------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        """Full rounds on a fixed schedule; quick rounds in between for replicas that need one now.

        The next full round has a deadline of its own, so a steady stream of quick rounds
        (pods turning Ready during a rollout, failure reports) cannot starve it.
        """
        interval = self._config.health.probe_interval_s
        rounds = 0
        next_full = time.monotonic()
        while True:
            wait = next_full - time.monotonic()
            if wait > 0 and not self._probe_now.is_set():
                try:
                    await asyncio.wait_for(self._probe_now.wait(), timeout=wait)
                except TimeoutError:
                    pass
            self._probe_now.clear()
            full_round = time.monotonic() >= next_full
            if full_round:
                rounds += 1
                # Until the first view is published, go round quickly: start-up waits on it.
                next_full = time.monotonic() + (interval if self._warm.is_set() else 0.05)
            ids = [rid for rid in self._table.replica_ids() if self._probe_wanted(rid, full_round)]
            await self._probe_all(ids, refresh_models=full_round and rounds % MODELS_REFRESH_ROUNDS == 0)
            if full_round and self._table.discovery.synced and not self._warm.is_set():
                self._warm.set()
                self._wake_pollers()
                log.info("replica view ready: %d replica(s)", len(self._table.replica_ids()))

    def _probe_wanted(self, replica_id: str, full_round: bool) -> bool:
        endpoint = self._table.endpoint(replica_id)
        if endpoint is None or not endpoint.url or endpoint.state is not ReplicaState.READY:
            return False  # PENDING/DRAINING as the source says: nothing to check
        if full_round:
            return True
        state = self._table.state(replica_id)
        return state is ReplicaState.PENDING or self._table.due_for_readmission(replica_id)

    async def _probe_all(self, replica_ids: list[str], refresh_models: bool) -> None:
        semaphore = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def probe_one(replica_id: str) -> None:
            endpoint = self._table.endpoint(replica_id)
            if endpoint is None:
                return
            want_models = not endpoint.models and (refresh_models or self._table.needs_models(replica_id))
            async with semaphore:
                result = await self._prober.probe(endpoint.url, want_models)
            if self._table.endpoint(replica_id) == endpoint:  # still the same process
                self._table.probe_result(replica_id, result.ok, result.error, result.models)

        await asyncio.gather(*(probe_one(rid) for rid in replica_ids))

    def _ready_targets(self) -> list[tuple[str, str]]:
        return [(v.replica_id, v.url) for v in self._table.snapshot().replicas if v.state is ReplicaState.READY]

    # -- what ingress replicas call ------------------------------------------------------

    async def snapshot_since(self, epoch: str | None, version: int, timeout_s: float = LONG_POLL_TIMEOUT_S) -> Snapshot | None:
        """The current snapshot once it is newer than (epoch, version) and publishable; None on timeout."""
        deadline = time.monotonic() + timeout_s
        while not self._publishable() or (epoch == self._table.epoch and self._table.version <= version):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)
            except TimeoutError:
                return None
        return self._table.snapshot()

    async def loads_since(self, epoch: str | None, version: int) -> LoadUpdate | None:
        """Every READY replica's latest load once a scrape round newer than (epoch, version) lands."""
        return await self._loads.since(epoch, version)

    def report_failure(self, replica_id: str, reason: str) -> None:
        """Passive health from an ingress replica: eject it for everyone."""
        log.warning("replica %s reported failing: %s", replica_id, reason)
        self._table.report_failure(replica_id, reason)
        self._probe_now.set()

    def share_placements(self, origin: str, placements: list[tuple[str, tuple[int, ...]]]) -> None:
        """An ingress replica's recent routing placements, for the others' prefix indexes."""
        self._placements.share(origin, placements)

    async def placements_since(self, origin: str, seq: int) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
        return await self._placements.since(origin, seq)

    def push_metrics(self, source_id: str, families: tuple[FamilyData, ...]) -> None:
        self._metrics.replicas_live(self._table.replica_ids())
        self._metrics.push(source_id, families)

    def metrics_text(self) -> bytes:
        self._metrics.replicas_live(self._table.replica_ids())
        return render([*self._metrics.merged(), *replica_state_metrics(self._table.snapshot())])

    def current(self) -> Snapshot:
        return self._table.snapshot()

    async def __del__(self) -> None:
        self._loops.cancel()
        await self._session.close()
