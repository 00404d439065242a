"""A relay of routing placements between ingress replicas, so their prefix indexes agree.

In approximate mode each ingress replica's prefix index learns only from its own
placements: four ingress replicas would each place a new system prompt somewhere
else, and the prompt would be cached four times over. Each ingress replica therefore
sends the placements it made (replica, block keys) here every ~100 ms, off the request
path, and long-polls for everyone else's. A placement reaches the other ingress
replicas within about one push interval. Bounded: the last MAX_ENTRIES placements.
"""

from __future__ import annotations

import asyncio
from collections import deque

MAX_ENTRIES = 4096
MAX_REPLY = 1024
LONG_POLL_TIMEOUT_S = 20.0

# (sequence number, origin ingress id, replica id, block keys)
Placement = tuple[int, str, str, tuple[int, ...]]


class PlacementRelay:
    def __init__(self) -> None:
        self._entries: deque[Placement] = deque(maxlen=MAX_ENTRIES)
        self._seq = 0
        self._changed = asyncio.Event()

    def share(self, origin: str, placements: list[tuple[str, tuple[int, ...]]]) -> None:
        for replica_id, keys in placements:
            self._seq += 1
            self._entries.append((self._seq, origin, replica_id, keys))
        if placements:
            self._changed.set()
            self._changed = asyncio.Event()

    async def since(
        self, origin: str, seq: int, timeout_s: float = LONG_POLL_TIMEOUT_S
    ) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
        """(latest seq, placements after ``seq`` made by other ingress replicas)."""
        if self._seq <= seq:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=timeout_s)
            except TimeoutError:
                return self._seq, []
        if seq > self._seq:
            seq = 0  # a restarted relay counts from 0 again
        fresh = [(rid, keys) for s, o, rid, keys in self._entries if s > seq and o != origin]
        return self._seq, fresh[-MAX_REPLY:]
