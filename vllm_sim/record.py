"""A bounded record of the exact response bodies written, so tests can compare bytes."""

from __future__ import annotations

from collections import OrderedDict


class ResponseRecord:
    """Last `capacity` response bodies, keyed by request id (oldest dropped first)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = max(1, capacity)
        self._bodies: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._bodies)

    def put(self, key: str, body: bytes) -> None:
        bodies = self._bodies
        bodies.pop(key, None)
        bodies[key] = body
        if len(bodies) > self.capacity:
            bodies.popitem(last=False)

    def get(self, key: str) -> bytes | None:
        return self._bodies.get(key)
