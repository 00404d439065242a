"""The simulated engine: vLLM's scheduler loop over a KV block pool, in virtual GPU time.

No HTTP here. A route submits a sequence, waits for tokens, and releases the sequence
in `finally`, so a slot or a block can never leak whatever happens to the client.

One asyncio task runs the loop, and only while there is work. Each step, as in vLLM's
V1 scheduler:

1. running sequences, oldest first, get their next tokens: one for a decoding
   sequence, the rest of the prompt (up to the token budget) for one still in prefill.
   A sequence that needs a new block and finds none preempts the newest running
   sequence (its blocks are freed, it goes back to the front of the queue and later
   recomputes, mostly from cached blocks);
2. then, if nothing was preempted, waiting sequences are admitted in FIFO order while a
   slot, budget and blocks remain. Admission looks up the prefix cache (whole blocks,
   never the last prompt token), pins the hit blocks and allocates the rest. The first
   one that does not fit stops admission (vLLM never answers 429; the queue grows).

Full blocks are cached when scheduled (BlockStored); evicted when reused (BlockRemoved).
The step then "runs" for

    prefill_tokens * prefill_per_token + (itl + decode_per_seq * (decoding - 1) if decoding)

seconds; a zero-length step yields with `asyncio.sleep(0)`. At its end every sequence
whose scheduled tokens completed its known tokens samples one token. `--ttft` is a
per-request delay before the request reaches the queue (tokenisation, API server),
overlapped with everything else, so a lone request on an idle engine sees
TTFT = ttft + uncached prompt tokens * prefill_per_token and ITL = itl.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .hashing import ROOT_DIGEST, chain_digests, external_hash
from .kv_cache import Block, BlockPool
from .kv_events import EventPublisher, NullPublisher

# Outcomes a finished sequence can have; "stop" and "length" are successes.
SUCCESS_REASONS = ("stop", "length")
ABORT = "abort"
ERROR = "error"

# Where a sequence is in its life.
DELAYED, WAITING, RUNNING, DONE, RELEASED = "delayed", "waiting", "running", "done", "released"


class EngineDead(RuntimeError):
    """The engine loop crashed; requests fail instead of hanging."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    ttft: float = 0.05
    itl: float = 0.01
    prefill_per_token: float = 0.0
    decode_per_seq: float = 0.0
    num_gpu_blocks: int = 1024
    block_size: int = 16
    enable_prefix_caching: bool = True


@dataclass(slots=True, eq=False)
class Seq:
    """One request inside the engine (waiting, running, or done)."""

    prompt_ids: list[int]
    output_ids: Sequence[int]
    max_new_tokens: int  # tokens to produce; 0 = prefill only (embeddings)
    use_cache: bool
    digests: list[bytes]  # chained digests of the whole blocks known so far
    hashes: list[int]  # their 64-bit forms (cache keys, event hashes)
    num_tokens: int = 0  # prompt + tokens sampled so far (the last one's KV not computed yet)
    state: str = WAITING
    generated: int = 0
    num_computed: int = 0  # tokens whose KV is computed (or scheduled this step)
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    blocks: list[Block] = field(default_factory=list)
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    first_token_at: float | None = None
    outcome: str = ABORT  # overwritten on success; anything else counts as not completed
    failed: bool = False
    waiter: asyncio.Future[None] | None = None
    wake_after: int = 0  # the waiter wants more than this many tokens (or the end)
    timer: asyncio.TimerHandle | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.state in (DONE, RELEASED)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output."""
        prompt = self.prompt_ids
        plen = len(prompt)
        if end <= plen:
            return prompt[start:end]
        head = prompt[start:] if start < plen else []
        return head + list(self.output_ids[max(0, start - plen) : end - plen])


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
    preemptions_total: int = 0
    steps_total: int = 0
    busy_seconds: float = 0.0  # sum of step times: the simulated GPU's busy time
    # Tokens computed by prefill (chunks included): prefix-cache hits are not computed,
    # tokens recomputed after a preemption are. What --prefill-per-token charges for.
    prefill_tokens_total: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})


@dataclass(slots=True)
class _Step:
    scheduled: list[tuple[Seq, int]]
    prefill_tokens: int
    decoding: int
    preempted: bool


class Engine:
    """Scheduler, block pool and counters of one simulated vLLM engine."""

    def __init__(self, config: EngineConfig, publisher: EventPublisher | None = None) -> None:
        self.config = config
        self.max_num_seqs = max(1, config.max_num_seqs)
        # vLLM refuses a budget below max_num_seqs; we raise it so every decode fits.
        self.token_budget = max(config.max_num_batched_tokens, self.max_num_seqs)
        self.block_size = config.block_size
        self.publisher: EventPublisher = publisher or NullPublisher()
        self.pool = BlockPool(
            config.num_gpu_blocks, config.block_size,
            enable_caching=config.enable_prefix_caching,
            record_events=not isinstance(self.publisher, NullPublisher),
        )
        self.stats = EngineStats()
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.dead: BaseException | None = None

    # ----- figures -----------------------------------------------------------------

    @property
    def instant_decode(self) -> bool:
        """Decode steps take no time (--itl 0 and --decode-per-seq 0)."""
        return self.config.itl == 0 and self.config.decode_per_seq == 0

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by running sequences (what vLLM reports)."""
        return self.pool.usage

    # ----- the route's side ----------------------------------------------------------

    def submit(
        self, prompt_ids: list[int], max_new_tokens: int, output_ids: Sequence[int] = (), *,
        use_cache: bool = True,
    ) -> Seq:
        """Queue a request; it reaches the waiting queue after --ttft (FIFO from there)."""
        if self.dead is not None:
            raise EngineDead("engine loop is dead") from self.dead
        use_cache = use_cache and self.pool.enable_caching
        digests = chain_digests(prompt_ids, self.block_size) if use_cache else []
        seq = Seq(
            prompt_ids=prompt_ids, output_ids=output_ids, max_new_tokens=max_new_tokens,
            use_cache=use_cache, digests=digests, hashes=[external_hash(d) for d in digests],
            num_tokens=len(prompt_ids),
        )
        if self.config.ttft > 0:
            seq.state = DELAYED
            seq.timer = asyncio.get_running_loop().call_later(self.config.ttft, self._enqueue, seq)
        else:
            self._enqueue(seq)
        return seq

    async def wait(self, seq: Seq, seen: int = 0) -> None:
        """Return once `seq` has more than `seen` tokens or is done; raise if the loop died."""
        while seq.generated <= seen and not seq.done:
            if seq.failed:
                raise EngineDead("engine loop is dead") from self.dead
            waiter = asyncio.get_running_loop().create_future()
            seq.waiter = waiter
            seq.wake_after = seen
            try:
                await waiter
            finally:
                seq.waiter = None
        if seq.failed:
            raise EngineDead("engine loop is dead") from self.dead

    def release(self, seq: Seq) -> None:
        """Take the sequence out wherever it is, free its blocks, count its outcome.

        Safe to call twice; a client disconnect (also while queued) ends up here.
        """
        state = seq.state
        if state == RELEASED:
            return
        if state == DELAYED and seq.timer is not None:
            seq.timer.cancel()
        elif state == WAITING:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        elif state == RUNNING:
            self._running.remove(seq)
            self._free(seq)
        seq.state = RELEASED
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
        if state in (WAITING, RUNNING):
            self._wake.set()  # a slot, blocks or the queue head changed

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (AllBlocksCleared); False while requests hold blocks."""
        ok = self.pool.reset()
        self._publish()
        return ok

    # ----- the loop ------------------------------------------------------------------

    def _enqueue(self, seq: Seq) -> None:
        seq.timer = None
        seq.state = WAITING
        self._waiting.append(seq)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._running or self._waiting:
                started = loop.time()
                step = self._schedule()
                if not step.scheduled:
                    if not step.preempted:
                        # Nothing fits now; a release or an arrival changes that.
                        self._wake.clear()
                        await self._wake.wait()
                    continue
                duration = self.step_seconds(step.prefill_tokens, step.decoding)
                self.stats.busy_seconds += duration
                self.stats.prefill_tokens_total += step.prefill_tokens
                if duration > 0:
                    await asyncio.sleep(max(0.0, started + duration - loop.time()))
                else:
                    await asyncio.sleep(0)  # let the routes run between instant steps
                self._complete(step, loop.time())
        except Exception as exc:  # a bug: fail every request rather than hang them
            traceback.print_exc(file=sys.stderr)
            self.dead = exc
            for seq in [*self._running, *self._waiting]:
                seq.failed = True
                seq.state = DONE
                _wake(seq)
            self._running.clear()
            self._waiting.clear()
        finally:
            self._task = None

    def step_seconds(self, prefill_tokens: int, decoding: int) -> float:
        """Virtual GPU time of a step that computes `prefill_tokens` prompt tokens and
        decodes one token for each of `decoding` sequences."""
        config = self.config
        seconds = prefill_tokens * config.prefill_per_token
        if decoding:
            seconds += config.itl + config.decode_per_seq * (decoding - 1)
        return seconds

    def _schedule(self) -> _Step:
        step = _Step([], 0, 0, False)
        budget = self.token_budget
        running = self._running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            count = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + count, step):
                break  # it preempted itself: it was the newest, nothing after it
            self._add(step, seq, count)
            budget -= count
            i += 1
        if step.preempted:
            self._publish()
            return step
        waiting, pool = self._waiting, self.pool
        while waiting and len(running) < self.max_num_seqs and budget > 0:
            seq = waiting[0]
            hits: list[Block] = []
            if seq.use_cache:
                # Never the last token: vLLM recomputes it to get logits to sample from.
                hits = pool.lookup(self._hashes(seq, (seq.num_tokens - 1) // self.block_size))
            computed = len(hits) * self.block_size
            count = min(seq.num_tokens - computed, budget)
            new_blocks = self._blocks_for(computed + count) - len(hits)
            if new_blocks + pool.evictable(hits) > pool.num_free:
                break
            waiting.popleft()
            pool.touch(hits)
            seq.blocks = hits + pool.allocate(new_blocks)
            seq.num_computed = computed
            seq.num_cached_blocks = len(hits)
            seq.state = RUNNING
            running.append(seq)
            if seq.use_cache and seq.preemptions == 0:
                seq.cached_tokens = computed
                self.stats.prefix_queries_tokens += seq.num_tokens
                self.stats.prefix_hits_tokens += computed
            if len(running) > self.stats.max_seen_running:
                self.stats.max_seen_running = len(running)
            self._cache_full_blocks(seq, computed + count)
            self._add(step, seq, count)
            budget -= count
        return step

    def _add(self, step: _Step, seq: Seq, count: int) -> None:
        step.scheduled.append((seq, count))
        if seq.generated and count == 1 and seq.num_computed == seq.num_tokens - 1:
            step.decoding += 1
        else:
            step.prefill_tokens += count

    def _grow(self, seq: Seq, tokens: int, step: _Step) -> bool:
        """Give `seq` blocks for `tokens` tokens, preempting the newest running sequence
        until they fit; False if `seq` had to preempt itself."""
        pool = self.pool
        need = self._blocks_for(tokens) - len(seq.blocks)
        while need > pool.num_free:
            victim = self._running.pop()
            self._preempt(victim)
            step.preempted = True
            if victim is seq:
                return False
        if need > 0:
            seq.blocks.extend(pool.allocate(need))
        self._cache_full_blocks(seq, tokens)
        return True

    def _preempt(self, seq: Seq) -> None:
        """vLLM's recompute preemption: free everything, back to the head of the queue."""
        self._free(seq)
        seq.num_computed = 0
        seq.num_cached_blocks = 0
        seq.preemptions += 1
        seq.state = WAITING
        self._waiting.appendleft(seq)
        self.stats.preemptions_total += 1

    def _free(self, seq: Seq) -> None:
        self.pool.free(seq.blocks)
        seq.blocks = []

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _hashes(self, seq: Seq, count: int) -> list[int]:
        """The first `count` block hashes of the sequence, hashing newly full blocks."""
        known = len(seq.hashes)
        if count > known:
            size = self.block_size
            parent = seq.digests[-1] if seq.digests else ROOT_DIGEST
            tokens = seq.tokens(known * size, count * size)
            new = chain_digests(tokens, size, parent)
            seq.digests.extend(new)
            seq.hashes.extend(external_hash(d) for d in new)
        return seq.hashes[:count]

    def _cache_full_blocks(self, seq: Seq, tokens: int) -> None:
        """Register the sequence's newly full blocks in the prefix cache (BlockStored)."""
        if not seq.use_cache:
            return
        size = self.block_size
        full = min(tokens, seq.num_tokens) // size
        first = seq.num_cached_blocks
        if full <= first:
            return
        hashes = self._hashes(seq, full)[first:]
        parent = seq.hashes[first - 1] if first else None
        self.pool.cache(seq.blocks[first:full], hashes, parent, seq.tokens(first * size, full * size))
        seq.num_cached_blocks = full

    def _complete(self, step: _Step, now: float) -> None:
        """End of a step: advance computed tokens, sample, finish, wake the routes."""
        self.stats.steps_total += 1
        for seq, count in step.scheduled:
            if seq.state != RUNNING:
                continue  # released (client gone) or preempted during the step
            seq.num_computed += count
            if seq.num_computed < seq.num_tokens:
                continue  # a prefill chunk; more to come
            if seq.generated < seq.max_new_tokens:
                seq.generated += 1
                seq.num_tokens += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            if seq.generated >= seq.max_new_tokens:
                self._running.remove(seq)
                self._free(seq)
                seq.state = DONE
            _wake(seq)
        self._publish()

    def _publish(self) -> None:
        events = self.pool.take_events()
        if events:
            self.publisher.publish(events)


def _wake(seq: Seq) -> None:
    """Resolve the route's waiter if what it waits for has happened."""
    waiter = seq.waiter
    if waiter is not None and not waiter.done() and (
        seq.generated > seq.wake_after or seq.state != RUNNING
    ):
        waiter.set_result(None)
