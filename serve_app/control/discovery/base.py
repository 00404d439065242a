"""The one small interface every discovery source implements."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ...replicas import DiscoveryStatus, Endpoint


class DiscoverySink(Protocol):
    """Where a source writes what it sees (the health actor's replica table)."""

    def upsert(self, endpoint: Endpoint) -> None: ...

    def remove(self, replica_id: str) -> None: ...

    def replace_all(self, endpoints: Iterable[Endpoint]) -> None: ...

    def set_discovery_status(self, status: DiscoveryStatus) -> None: ...


class DiscoverySource(Protocol):
    async def run(self, sink: DiscoverySink) -> None:
        """Keep `sink` in step with the backend until cancelled; never return early."""
        ...
