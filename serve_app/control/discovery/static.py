"""Static discovery: a fixed list of URLs (also what the local demo uses).

Whether each URL is alive is the health prober's job, not this source's.
"""

from __future__ import annotations

import asyncio

from ...replicas import DiscoveryStatus, Endpoint, ReplicaState
from .base import DiscoverySink


class StaticSource:
    def __init__(self, urls: list[str], models: dict[str, list[str]] | None = None) -> None:
        models = models or {}
        self._endpoints = [
            Endpoint(
                replica_id=url,
                url=url,
                models=tuple(models.get(url, ())),
                state=ReplicaState.READY,
                source="static",
            )
            for url in urls
        ]

    async def run(self, sink: DiscoverySink) -> None:
        sink.replace_all(self._endpoints)
        sink.set_discovery_status(DiscoveryStatus(synced=True, message=f"{len(self._endpoints)} static URL(s)"))
        await asyncio.Event().wait()  # nothing ever changes
