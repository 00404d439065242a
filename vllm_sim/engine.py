"""The simulated scheduler: running slots, a FIFO waiting queue and a prefix cache.

No HTTP here. The routes admit a sequence, sleep for the time the engine says, and
release the sequence in `finally`, so a slot can never leak whatever happens to the
client connection.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from .config import BLOCK_SIZE

# Outcomes a finished sequence can have; "stop" and "length" are successes.
SUCCESS_REASONS = ("stop", "length")
ABORT = "abort"
ERROR = "error"


@dataclass(slots=True)
class Seq:
    """One admitted request while it holds a running slot."""

    prompt_len: int
    cached_tokens: int
    prefill_seconds: float
    generated: int = 0
    blocks: int = 0
    outcome: str = ABORT  # overwritten on success; anything else counts as not completed
    released: bool = False


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters the metrics and /sim/stats read."""

    aborted_total: int = 0
    completed_total: int = 0
    failed_total: int = 0
    max_seen_running: int = 0
    prefix_queries_tokens: int = 0
    prefix_hits_tokens: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})


class PrefixCache:
    """LRU of full 16-token blocks, keyed by a hash chained over the prefix (like vLLM)."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(0, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup_and_insert(self, tokens: Sequence[Hashable]) -> int:
        """Return how many leading tokens were cached, then cache all full blocks."""
        if self.capacity == 0:
            return 0
        blocks = self._blocks
        parent = 0
        hit_blocks = 0
        missed = False
        for start in range(0, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
            parent = hash((parent, tuple(tokens[start : start + BLOCK_SIZE])))
            if parent in blocks:
                blocks.move_to_end(parent)
                if not missed:
                    hit_blocks += 1
            else:
                missed = True
                blocks[parent] = None
                if len(blocks) > self.capacity:
                    blocks.popitem(last=False)
        cached = hit_blocks * BLOCK_SIZE
        if cached and cached >= len(tokens):
            # vLLM always recomputes the last prompt token to get logits for sampling.
            cached -= BLOCK_SIZE
        return cached


class Engine:
    """Admission control and bookkeeping for a vLLM-like engine."""

    def __init__(
        self,
        *,
        max_num_seqs: int,
        ttft: float,
        itl: float,
        prefill_per_token: float,
        prefix_cache_blocks: int,
    ) -> None:
        self.max_num_seqs = max(1, max_num_seqs)
        self.ttft = ttft
        self.itl = itl
        self.prefill_per_token = prefill_per_token
        self.num_blocks = max(1, prefix_cache_blocks)
        self.prefix_cache = PrefixCache(prefix_cache_blocks)
        self.stats = EngineStats()
        self._running = 0
        self._held_blocks = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by running sequences (what vLLM reports)."""
        return min(1.0, self._held_blocks / self.num_blocks)

    async def admit(self, tokens: Sequence[Hashable], *, use_prefix_cache: bool = True) -> Seq:
        """Wait (FIFO) for a running slot; cancellation while waiting leaves no trace."""
        if self._running < self.max_num_seqs and not self._waiters:
            self._running += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.cancelled():
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass
                else:
                    # The slot was handed over just as we were cancelled: pass it on.
                    self._free_slot()
                self.stats.aborted_total += 1
                self.stats.finished[ABORT] += 1
                raise
        if self._running > self.stats.max_seen_running:
            self.stats.max_seen_running = self._running
        prompt_len = len(tokens)
        cached = self.prefix_cache.lookup_and_insert(tokens) if use_prefix_cache else 0
        if use_prefix_cache:
            self.stats.prefix_queries_tokens += prompt_len
            self.stats.prefix_hits_tokens += cached
        seq = Seq(
            prompt_len=prompt_len,
            cached_tokens=cached,
            prefill_seconds=self.ttft + (prompt_len - cached) * self.prefill_per_token,
        )
        self._set_blocks(seq, prompt_len)
        return seq

    def grow(self, seq: Seq, generated: int) -> None:
        """Account the KV blocks a sequence holds after `generated` output tokens."""
        seq.generated = generated
        self._set_blocks(seq, seq.prompt_len + generated)

    def release(self, seq: Seq) -> None:
        """Free the slot and count the outcome; safe to call twice."""
        if seq.released:
            return
        seq.released = True
        self._held_blocks -= seq.blocks
        seq.blocks = 0
        stats = self.stats
        stats.prompt_tokens_total += seq.prompt_len
        stats.generation_tokens_total += seq.generated
        if seq.outcome in SUCCESS_REASONS:
            stats.completed_total += 1
            stats.finished[seq.outcome] += 1
        elif seq.outcome == ERROR:
            stats.failed_total += 1
        else:
            stats.aborted_total += 1
            stats.finished[ABORT] += 1
        self._free_slot()

    def _set_blocks(self, seq: Seq, tokens: int) -> None:
        blocks = -(-tokens // BLOCK_SIZE)
        self._held_blocks += blocks - seq.blocks
        seq.blocks = blocks

    def _free_slot(self) -> None:
        """Hand the slot to the oldest live waiter, or give it back."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._running -= 1
