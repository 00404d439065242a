"""Which replica holds which prompt block: a bounded, per-replica LRU model of prefix caches.

Fed two ways, with the same keys (``routers.prefix``):

- **approximate**: the gateway records where it sent each prompt's blocks; each
  replica's entry is an LRU sized like that replica's KV cache (when its size is
  known), so the model forgets what the replica itself would have evicted;
- **precise**: a KV-event consumer adds and removes blocks as the replica reports them.

Memory is bounded by ``max_blocks`` entries in total, whatever the traffic: each of
the R replicas known keeps at most ``max_blocks // R`` blocks (and at most its own
cache size). A replica that leaves is forgotten with all its entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

DEFAULT_MAX_BLOCKS = 1 << 18
# Measured with tracemalloc on CPython 3.11 (tests check the bound): one block held
# by one replica costs about this much, its key in the replica's LRU and in the
# shared holders map included.
BYTES_PER_ENTRY = 300


class PrefixIndex:
    """block key -> replicas holding it, plus one LRU per replica for eviction."""

    __slots__ = ("_holders", "_lru", "_capacity", "_max_blocks", "_entries")

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        # Tuples, not sets: most blocks have one or two holders, and a set costs 4x the memory.
        self._holders: dict[int, tuple[str, ...]] = {}
        self._lru: dict[str, dict[int, None]] = {}
        self._capacity: dict[str, int] = {}  # the replica's own cache size, in blocks
        self._max_blocks = max_blocks
        self._entries = 0

    # -- reading ---------------------------------------------------------------------

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """replica_id -> how many leading blocks of ``keys`` it holds (only replicas with >= 1).

        A replica's holdings are prefix-closed: its LRU evicts a chain from the tail (``add``
        makes a chain's first block its most recent), and vLLM frees a sequence's blocks
        tail first. So "holds the first d blocks" is monotone in d and a binary search
        along the chain finds the depth: ~log2(blocks) lookups per holder instead of one
        per block (7 instead of 127 for a 2,000-token prompt).
        """
        if not keys:
            return {}
        get = self._holders.get
        first = get(keys[0])
        if not first:
            return {}
        n = len(keys)
        last = get(keys[n - 1])
        matched: dict[str, int] = {}
        for replica_id in first:
            if last is not None and replica_id in last:
                matched[replica_id] = n
                continue
            lo, hi = 1, n - 1  # the depth is in [lo, hi]: keys[lo - 1] held, keys[hi] not
            while lo < hi:
                mid = (lo + hi + 1) >> 1
                held = get(keys[mid - 1])
                if held is not None and replica_id in held:
                    lo = mid
                else:
                    hi = mid - 1
            matched[replica_id] = lo
        return matched

    def blocks_of(self, replica_id: str) -> int:
        lru = self._lru.get(replica_id)
        return len(lru) if lru is not None else 0

    def capacity_of(self, replica_id: str) -> int | None:
        """The replica's modelled cache size in blocks, when known (``set_capacity``)."""
        return self._capacity.get(replica_id)

    def __len__(self) -> int:
        """Entries (block, replica) held: what the memory bound counts."""
        return self._entries

    @property
    def max_blocks(self) -> int:
        return self._max_blocks

    def memory_bytes(self) -> int:
        """An estimate of the index's memory (see BYTES_PER_ENTRY)."""
        return self._entries * BYTES_PER_ENTRY

    def replicas(self) -> list[str]:
        return list(self._lru)

    # -- writing ---------------------------------------------------------------------

    def set_capacity(self, replica_id: str, blocks: int | None) -> None:
        """The replica's own cache size in index blocks (None: unknown, use the fair share)."""
        if blocks is None or blocks < 1:
            self._capacity.pop(replica_id, None)
        elif self._capacity.get(replica_id) != blocks:
            self._capacity[replica_id] = blocks
            lru = self._lru.get(replica_id)
            if lru is not None:
                self._trim(replica_id, lru)

    def add(self, replica_id: str, keys: Sequence[int], touch: bool = True) -> None:
        """``replica_id`` now holds ``keys`` (a prompt's chain, in order), most recently used.

        ``touch=False`` leaves blocks already held where they are in the LRU: a KV event
        that reports a chain's new tail must not make it younger than the prefix it
        hangs from, or the LRU would evict that prefix first.
        """
        if not keys:
            return
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = {}
            self._trim_all()  # one more replica: everyone's fair share shrinks
        holders = self._holders
        # Newest-used last, and the chain's first block most recent of all: an LRU
        # then evicts a chain from its tail, never leaving a block without its parent.
        for key in reversed(keys):
            if key in lru:
                if touch:
                    del lru[key]  # re-inserted below: a plain dict keeps insertion order
                    lru[key] = None
                continue
            lru[key] = None
            self._entries += 1
            held = holders.get(key)
            holders[key] = (replica_id,) if held is None else (*held, replica_id)
        self._trim(replica_id, lru)

    def remove(self, replica_id: str, keys: Iterable[int]) -> None:
        """``replica_id`` no longer holds ``keys`` (evicted, as a KV event says)."""
        lru = self._lru.get(replica_id)
        if lru is None:
            return
        for key in keys:
            if key in lru:
                del lru[key]
                self._drop_holder(key, replica_id)

    def clear(self, replica_id: str) -> None:
        """Forget everything ``replica_id`` holds (its cache was reset, or it restarted)."""
        lru = self._lru.get(replica_id)
        if lru is None:
            return
        for key in lru:
            self._drop_holder(key, replica_id)
        lru.clear()

    def forget(self, replica_id: str) -> None:
        """The replica is gone: drop it and its entries."""
        self.clear(replica_id)
        self._lru.pop(replica_id, None)
        self._capacity.pop(replica_id, None)

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget every replica not in ``replica_ids``."""
        keep = set(replica_ids)
        for replica_id in [r for r in self._lru if r not in keep]:
            self.forget(replica_id)

    # -- bounds ----------------------------------------------------------------------

    def _limit(self, replica_id: str) -> int:
        share = max(1, self._max_blocks // max(1, len(self._lru)))
        own = self._capacity.get(replica_id)
        return min(share, own) if own is not None else share

    def _trim(self, replica_id: str, lru: dict[int, None]) -> None:
        limit = self._limit(replica_id)
        excess = len(lru) - limit
        if excess <= 0:
            return
        oldest = []
        for key in lru:  # insertion order: least recently used first
            oldest.append(key)
            if len(oldest) == excess:
                break
        for key in oldest:
            del lru[key]
            self._drop_holder(key, replica_id)

    def _trim_all(self) -> None:
        for replica_id, lru in self._lru.items():
            self._trim(replica_id, lru)

    def _drop_holder(self, key: int, replica_id: str) -> None:
        self._entries -= 1
        held = self._holders.get(key)
        if held is None:
            return
        rest = tuple(r for r in held if r != replica_id)
        if rest:
            self._holders[key] = rest
        else:
            del self._holders[key]
