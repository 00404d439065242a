"""Per-model rotating counters, shared by round robin and tie-breaking."""

from __future__ import annotations

import itertools

DEFAULT_MAX_KEYS = 1024


class Rotation:
    """Hands out 0, 1, 2, ... per key; forgets the oldest key past ``max_keys``.

    Bounded because the model name comes from the request: a client sending
    many bogus model names must not grow this without limit. A forgotten key
    merely restarts at 0.
    """

    __slots__ = ("_counters", "_max_keys")

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._counters: dict[str, itertools.count[int]] = {}
        self._max_keys = max_keys

    def next(self, key: str) -> int:
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= self._max_keys:
                del self._counters[next(iter(self._counters))]
            counter = self._counters[key] = itertools.count()
        return next(counter)

    def __len__(self) -> int:
        return len(self._counters)
