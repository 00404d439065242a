"""Scrape every READY replica's `/metrics` often, for load-aware routing.

Apart from the health probes on purpose: its own connection pool with bounded
concurrency, so a round over hundreds of replicas at ~100 ms neither waits behind
probes nor starves them, and a slow replica only delays its own sample (each scrape
has a deadline of one interval). A failed scrape keeps the last sample, whose age
then tells routers not to trust it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import aiohttp

from ..replicas import LoadSample, LoadUpdate
from .load_metrics import ReplicaLoad, parse_load

SCRAPE_CONCURRENCY = 32
LONG_POLL_TIMEOUT_S = 20.0
# A queue that lasts this long means the running slots (or the KV cache) are full. A
# shorter one can be one long engine step: a request that arrives while a big prefill
# fills the step's token budget waits for the next step with slots free.
SATURATED_AFTER_S = 1.0


class LoadScraper:
    """Keeps the latest `LoadSample` per replica and wakes long-polls when a round lands."""

    def __init__(self, epoch: str, interval_s: float, clock: Callable[[], float] = time.time) -> None:
        self._epoch = epoch
        self._interval = interval_s
        self._clock = clock
        self._samples: dict[str, LoadSample] = {}
        self._peak_saturated: dict[str, int] = {}  # most running seen while a queue persisted
        self._queued_since: dict[str, float] = {}  # replicas queueing in every sample since then
        self._version = 0
        self._changed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    async def run(self, targets: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Scrape ``targets()`` (replica_id, url) every interval, forever."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=SCRAPE_CONCURRENCY, keepalive_timeout=4.0),
            timeout=aiohttp.ClientTimeout(total=max(self._interval, 0.05) * 2),
        )
        try:
            while True:
                started = time.monotonic()
                await self.scrape_round(list(targets()))
                await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))
        finally:
            await self._session.close()

    async def scrape_round(self, targets: list[tuple[str, str]]) -> None:
        assert self._session is not None
        session = self._session
        gate = asyncio.Semaphore(SCRAPE_CONCURRENCY)

        async def one(url: str) -> ReplicaLoad | None:
            async with gate:
                try:
                    async with session.get(url + "/metrics") as resp:
                        if resp.status != 200:
                            return None
                        return parse_load(await resp.text())
                except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError):
                    return None  # load is a hint; a failed scrape is not a health verdict

        loads = await asyncio.gather(*(one(url) for _, url in targets))
        self.apply({rid: load for (rid, _), load in zip(targets, loads)})

    def apply(self, loads: dict[str, ReplicaLoad | None]) -> None:
        """One round's results (None: that scrape failed); replicas not in ``loads`` are gone."""
        now = self._clock()
        samples: dict[str, LoadSample] = {}
        for replica_id, load in loads.items():
            if load is None:
                previous = self._samples.get(replica_id)
                if previous is not None:
                    samples[replica_id] = previous  # kept, and ageing
                continue
            # A queue seen in every sample for SATURATED_AFTER_S means the running slots are
            # full. A shorter one is not enough: a request that arrives mid-step waits for
            # the next step even with slots free (vLLM schedules per step), and a step that
            # prefills a long prompt can last longer than a scrape interval.
            since = self._queued_since.get(replica_id)
            if load.waiting > 0 and since is not None and now - since >= SATURATED_AFTER_S:
                peak = max(self._peak_saturated.get(replica_id, 0), load.running)
                self._peak_saturated[replica_id] = peak
            samples[replica_id] = LoadSample(
                load.running, load.waiting, load.kv_cache_usage, now,
                self._peak_saturated.get(replica_id), load.cache_tokens,
            )
        self._peak_saturated = {rid: v for rid, v in self._peak_saturated.items() if rid in loads}
        self._queued_since = {
            rid: self._queued_since.get(rid, now)
            for rid, load in loads.items() if load is not None and load.waiting > 0
        }
        self._samples = samples
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def current(self) -> LoadUpdate:
        return LoadUpdate(self._epoch, self._version, self._samples)

    async def since(self, epoch: str | None, version: int, timeout_s: float = LONG_POLL_TIMEOUT_S) -> LoadUpdate | None:
        """The samples once newer than (epoch, version); None on timeout."""
        if epoch == self._epoch and self._version <= version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=timeout_s)
            except TimeoutError:
                return None
        return self.current()
