"""The KV cache: a fixed pool of blocks with prefix caching, shaped like vLLM's BlockPool.

Blocks held by running sequences are pinned (reference counted). A freed block goes to
the back of the free queue but keeps its hash, so a later request with the same prefix
can take it back; it is only evicted (hash dropped, BlockRemoved) when the front of the
queue is reused for new data. A sequence frees its blocks tail first, so the end of a
chain is evicted before its beginning, as in vLLM.

The pool records KV cache events (plain dicts in vLLM's field order) when asked to;
the engine drains them once per step and hands them to the publisher.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# What vLLM writes in `medium` for device blocks, and the spec kind of a plain model.
MEDIUM_GPU = "GPU"
FULL_ATTENTION = "full_attention"


@dataclass(slots=True, eq=False)
class Block:
    """One physical block; `block_hash` is set while it holds a cached full block."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    """Free queue (LRU) + hash -> block map + pinning, over `num_blocks` blocks."""

    def __init__(
        self, num_blocks: int, block_size: int, *, enable_caching: bool = True,
        record_events: bool = False,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.record_events = record_events and enable_caching
        blocks = [Block(i) for i in range(num_blocks)]
        # Front = next to be reused (and evicted if it is cached).
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in blocks)
        # vLLM does not de-duplicate: two requests computing the same block at once both
        # cache their copy; a lookup takes any of them.
        self._cached: dict[int, dict[int, Block]] = {}
        self.num_cached_blocks = 0
        self.evicted_total = 0
        self.events: list[dict[str, Any]] = []

    # ----- figures -----------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks not pinned by any sequence (empty ones and evictable cached ones)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks pinned by running sequences (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self._free) / self.num_blocks

    # ----- prefix lookup -------------------------------------------------------------

    def lookup(self, hashes: Sequence[int]) -> list[Block]:
        """Cached blocks for the longest prefix of `hashes` (stops at the first miss)."""
        if not self.enable_caching:
            return []
        hits: list[Block] = []
        cached = self._cached
        for block_hash in hashes:
            copies = cached.get(block_hash)
            if not copies:
                break
            hits.append(next(iter(copies.values())))
        return hits

    @staticmethod
    def evictable(blocks: Iterable[Block]) -> int:
        """How many of `blocks` sit in the free queue (touching them takes them out)."""
        return sum(1 for b in blocks if b.ref_cnt == 0)

    # ----- pinning -------------------------------------------------------------------

    def touch(self, blocks: Iterable[Block]) -> None:
        """Pin prefix-hit blocks for one more sequence."""
        free = self._free
        for block in blocks:
            if block.ref_cnt == 0:
                del free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, count: int) -> list[Block]:
        """Take `count` blocks from the front of the free queue, evicting cached ones."""
        if count > len(self._free):
            raise ValueError(f"cannot allocate {count} blocks, {len(self._free)} free")
        free = self._free
        out: list[Block] = []
        for _ in range(count):
            _, block = free.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[Block]) -> None:
        """Unpin a sequence's blocks, tail first, so chain ends are evicted first."""
        free = self._free
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                free[block.block_id] = block

    # ----- caching -------------------------------------------------------------------

    def cache(
        self, blocks: Sequence[Block], hashes: Sequence[int], parent: int | None,
        token_ids: Sequence[int],
    ) -> None:
        """Register newly full blocks under their hashes (one BlockStored for the run)."""
        if not self.enable_caching or not blocks:
            return
        cached = self._cached
        for block, block_hash in zip(blocks, hashes):
            block.block_hash = block_hash
            copies = cached.get(block_hash)
            if copies is None:
                cached[block_hash] = {block.block_id: block}
            else:
                copies[block.block_id] = block
        self.num_cached_blocks += len(blocks)
        if self.record_events:
            self.events.append({
                "type": "BlockStored",
                "block_hashes": list(hashes),
                "parent_block_hash": parent,
                "token_ids": list(token_ids),
                "block_size": self.block_size,
                "lora_id": None,
                "medium": MEDIUM_GPU,
                "lora_name": None,
                "extra_keys": [None] * len(blocks),
                "group_idx": 0,
                "kv_cache_spec_kind": FULL_ATTENTION,
            })

    def _evict(self, block: Block) -> None:
        block_hash = block.block_hash
        assert block_hash is not None
        copies = self._cached.get(block_hash)
        if copies is not None:
            copies.pop(block.block_id, None)
            if not copies:
                del self._cached[block_hash]
        block.block_hash = None
        self.num_cached_blocks -= 1
        self.evicted_total += 1
        if self.record_events:
            self.events.append({
                "type": "BlockRemoved",
                "block_hashes": [block_hash],
                "medium": MEDIUM_GPU,
                "group_idx": 0,
            })

    def reset(self) -> bool:
        """Drop every cached hash (vLLM's reset_prefix_cache); refused while any block is
        pinned, since running sequences still need theirs."""
        if len(self._free) != self.num_blocks:
            return False
        for copies in self._cached.values():
            for block in copies.values():
                block.block_hash = None
        self._cached.clear()
        self.num_cached_blocks = 0
        if self.record_events:
            self.events.append({"type": "AllBlocksCleared"})
        return True

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
