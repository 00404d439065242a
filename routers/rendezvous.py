"""Rendezvous (highest-random-weight) hashing that every process computes alike.

Used to break ties the same way in every ingress replica (cache-aware placement of a
new prefix) and to pin sessions (session affinity): for a key, each replica gets a
pseudo-random weight and the highest wins; when a replica leaves, only the keys it
won move. Python's ``hash`` of a string differs per process, so replica ids are
hashed here with FNV-1a instead.
"""

from __future__ import annotations

from collections.abc import Iterable

_MASK64 = (1 << 64) - 1


def stable_id(text: str) -> int:
    """64-bit FNV-1a of ``text``: the same in every process."""
    value = 0xCBF29CE484222325
    for byte in text.encode("utf-8", "surrogatepass"):
        value = ((value ^ byte) * 0x100000001B3) & _MASK64
    return value


def weight(replica: int, key: int) -> int:
    """The weight of ``replica`` (a ``stable_id``) for ``key``: a 64-bit mix of both."""
    x = ((replica * 0x9E3779B97F4A7C15) ^ ((key + 1) * 0xBF58476D1CE4E5B9)) & _MASK64
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 29)


class StableIds:
    """A cache of ``stable_id`` per replica id (hashing a string per request adds up)."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def of(self, replica_id: str) -> int:
        found = self._ids.get(replica_id)
        if found is None:
            found = self._ids[replica_id] = stable_id(replica_id)
        return found

    def retain(self, replica_ids: Iterable[str]) -> None:
        keep = set(replica_ids)
        self._ids = {rid: v for rid, v in self._ids.items() if rid in keep}
