"""The simulated engine in-process: step timing, chunked prefill, the block pool.

Figures that the engine computes (tokens, blocks, events, steps, virtual step seconds,
prefill tokens) are asserted exactly. Wall-clock figures are only lower bounds measured
from before the request was submitted: a token cannot come earlier than the model says,
and a busy machine only makes it later. There are no wall-clock upper bounds or ratios
(a stalled test process breaks those), and no intervals that start at an observed token
(one observed late shortens them).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vllm_sim.engine import Engine, EngineConfig, Seq
from vllm_sim.hashing import block_hashes

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

# Timers may fire a hair early (asyncio's clock resolution): lower bounds get 1% slack.
EARLY = 0.99


class Recorder:
    """A publisher that keeps every batch of events (makes the pool record them)."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []

    @property
    def published(self) -> int:
        return len(self.batches)

    def publish(self, events: list[dict[str, Any]]) -> None:
        self.batches.append(list(events))

    def close(self) -> None:
        pass

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for batch in self.batches for e in batch if e["type"] == kind]


def engine(recorder: Recorder | None = None, **overrides: Any) -> Engine:
    settings: dict[str, Any] = {"ttft": 0.0, "itl": 0.0}
    settings.update(overrides)
    return Engine(EngineConfig(**settings), recorder)


def ids(tag: int, count: int) -> list[int]:
    """`count` distinct token ids, different for each tag."""
    return [tag * 100_000 + i for i in range(count)]


async def run(eng: Engine, prompt: list[int], max_new: int, outputs: list[int] | None = None,
              wakes: list[int] | None = None) -> tuple[Seq, list[float]]:
    """Submit, collect the arrival time of every token, release; returns (seq, times).

    `wakes`, if given, gets the number of new tokens each wake-up delivered.
    """
    loop = asyncio.get_running_loop()
    seq = eng.submit(prompt, max_new, outputs if outputs is not None else ids(9, max_new))
    times: list[float] = []
    try:
        seen = 0
        while not seq.done:
            await eng.wait(seq, seen)
            times.extend([loop.time()] * (seq.generated - seen))
            if wakes is not None and seq.generated > seen:
                wakes.append(seq.generated - seen)
            seen = seq.generated
        seq.outcome = "length"
    finally:
        eng.release(seq)
    return seq, times


async def until(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.002)


# ----- step timing -------------------------------------------------------------------


async def test_lone_request_sees_the_flags_ttft_and_itl() -> None:
    eng = engine(ttft=0.05, itl=0.02, prefill_per_token=0.001)
    loop = asyncio.get_running_loop()
    wakes: list[int] = []
    started = loop.time()
    seq, times = await run(eng, ids(1, 160), 6, wakes=wakes)
    assert seq.generated == 6
    # Virtual time: one prefill step of 160 tokens, then five lone decode steps.
    assert eng.stats.busy_seconds == pytest.approx(0.160 + 5 * 0.02)
    assert eng.stats.steps_total == 6 and eng.stats.prefill_tokens_total == 160
    assert wakes == [1] * 6  # each step's token reached the route on its own
    # Wall time: token k is due ttft + 160 uncached tokens x 1 ms + k decode steps after
    # the submit, never earlier (a slow machine only delays it).
    for k, at in enumerate(times):
        assert at - started >= (0.05 + 0.160 + k * 0.02) * EARLY, k


async def test_prefix_hit_prefills_only_the_uncached_tokens() -> None:
    eng = engine(prefill_per_token=0.002)
    prompt = ids(2, 160)  # 10 whole blocks of 16
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run(eng, prompt, 1)
    cold = loop.time() - started
    assert eng.stats.prefill_tokens_total == 160
    assert eng.stats.busy_seconds == pytest.approx(160 * 0.002)
    assert cold >= 160 * 0.002 * EARLY  # the prefill time was really spent

    started = loop.time()
    await run(eng, prompt, 1)
    warm = loop.time() - started
    # vLLM never reuses the block holding the last prompt token: 9 of 10 blocks hit, and
    # only the last block's 16 tokens are computed (and charged) again.
    assert eng.stats.prefix_queries_tokens == 320
    assert eng.stats.prefix_hits_tokens == 144
    assert eng.stats.prefill_tokens_total - 160 == 16
    assert eng.stats.busy_seconds == pytest.approx((160 + 16) * 0.002)
    assert warm >= 16 * 0.002 * EARLY


async def test_more_decoding_sequences_make_each_step_longer() -> None:
    eng = engine(itl=0.004, decode_per_seq=0.004, max_num_seqs=8)
    assert eng.step_seconds(0, 1) == pytest.approx(0.004)
    assert eng.step_seconds(0, 8) == pytest.approx(0.004 + 7 * 0.004)
    assert eng.step_seconds(100, 2) == pytest.approx(0.008)  # no prefill cost set

    await run(eng, ids(3, 20), 11)
    lone_busy = eng.stats.busy_seconds
    assert eng.stats.steps_total == 11  # one prefill step, then ten lone 4 ms decode steps
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(*(run(eng, ids(10 + k, 20), 11) for k in range(8)))
    batch_busy = eng.stats.busy_seconds - lone_busy
    assert eng.stats.steps_total == 22  # the eight share every step: 1 prefill + 10 decodes
    assert lone_busy == pytest.approx(10 * 0.004)
    assert batch_busy == pytest.approx(10 * (0.004 + 7 * 0.004))
    for _, times in results:  # each of the eight waited for the 32 ms steps
        for k, at in enumerate(times):
            assert at - started >= k * 0.032 * EARLY, k


async def test_zero_times_stay_fast_and_the_loop_stops_when_idle() -> None:
    eng = engine(max_num_seqs=4)
    results = await asyncio.gather(*(run(eng, ids(20 + k, 300), 400) for k in range(4)))
    assert all(seq.generated == 400 for seq, _ in results)
    # Fast means: no simulated time and no extra steps. The four share every step (one
    # prefill step, then 399 decode steps), each of which lasted zero seconds.
    assert eng.stats.steps_total == 400
    assert eng.stats.busy_seconds == 0
    assert eng._task is None  # no task left polling an idle engine


# ----- chunked prefill -----------------------------------------------------------------


async def test_chunked_prefill_splits_a_long_prompt_by_the_token_budget() -> None:
    rec = Recorder()
    eng = engine(rec, max_num_batched_tokens=32)
    prompt = ids(4, 100)
    seq, _ = await run(eng, prompt, 1)
    # 100 prompt tokens in chunks of 32, 32, 32, 4: four steps, the last one samples.
    assert eng.stats.steps_total == 4
    stored = rec.events("BlockStored")
    assert [len(e["block_hashes"]) for e in stored] == [2, 2, 2]  # cached as chunks land
    hashes = block_hashes(prompt, 16)
    assert [h for e in stored for h in e["block_hashes"]] == hashes  # 6 whole blocks
    assert [e["parent_block_hash"] for e in stored] == [None, hashes[1], hashes[3]]
    assert [e["token_ids"] for e in stored] == [prompt[0:32], prompt[32:64], prompt[64:96]]


async def test_decodes_take_their_token_of_the_budget_first() -> None:
    rec = Recorder()
    eng = engine(rec, itl=0.003, max_num_batched_tokens=32)
    decoder = asyncio.ensure_future(run(eng, ids(5, 8), 200))
    await until(lambda: eng.stats.steps_total >= 2)  # it is decoding now
    before = len(rec.events("BlockStored"))
    prompt = ids(6, 64)
    await run(eng, prompt, 1)
    mine = [e for e in rec.events("BlockStored")[before:] if set(e["token_ids"]) <= set(prompt)]
    # Chunks of 31 (32 minus the decode): 31 -> 1 block, 62 -> 3, 64 -> 4.
    assert [len(e["block_hashes"]) for e in mine] == [1, 2, 1]
    decoder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await decoder
    assert eng.running == 0 and eng.pool.num_free == eng.pool.num_blocks


# ----- the block pool ------------------------------------------------------------------


async def test_freed_blocks_stay_cached_until_evicted_tail_first() -> None:
    rec = Recorder()
    eng = engine(rec, num_gpu_blocks=8, block_size=4)
    a = ids(7, 8)  # two blocks
    await run(eng, a, 1)
    a_hashes = block_hashes(a, 4)
    assert eng.pool.num_cached_blocks == 2 and eng.pool.num_free == 8
    assert eng.kv_cache_usage == 0

    await run(eng, ids(8, 8), 1)  # fits in never-used blocks: nothing evicted
    assert rec.events("BlockRemoved") == []
    await run(eng, ids(9, 24), 1)  # six blocks: the LRU ones, A's included
    removed = [e["block_hashes"][0] for e in rec.events("BlockRemoved")]
    assert removed == [a_hashes[1], a_hashes[0]]  # the chain's tail goes first
    assert all(e["medium"] == "GPU" for e in rec.events("BlockRemoved"))

    hits = eng.stats.prefix_hits_tokens
    await run(eng, a, 1)
    assert eng.stats.prefix_hits_tokens == hits  # A was evicted: a full miss


async def test_running_sequences_pin_blocks_and_admission_waits_for_them() -> None:
    rec = Recorder()
    eng = engine(rec, itl=0.01, num_gpu_blocks=8, block_size=4)
    holder_prompt = ids(11, 12)
    holder = asyncio.ensure_future(run(eng, holder_prompt, 5))  # up to 16 tokens: 4 blocks
    await until(lambda: eng.running == 1)
    held = eng.pool.num_blocks - eng.pool.num_free
    assert held >= 3 and eng.kv_cache_usage == pytest.approx(held / 8)

    waiter = asyncio.ensure_future(run(eng, ids(12, 20), 1))  # needs 5 blocks
    await until(lambda: eng.waiting == 1)
    assert eng.running == 1  # a slot is free, blocks are not: it waits (no 429)
    # Pinned blocks are never evicted: the holder's prompt blocks are all still cached.
    assert len(eng.pool.lookup(block_hashes(holder_prompt, 4))) == 3
    assert eng.pool.evicted_total == 0
    seq, _ = await holder
    await waiter
    assert seq.generated == 5
    assert eng.stats.preemptions_total == 0 and eng.stats.max_seen_running == 1
    assert eng.pool.evicted_total > 0  # the waiter needed the holder's freed blocks


async def test_sequences_that_outgrow_the_cache_are_preempted_and_resume() -> None:
    eng = engine(itl=0.002, num_gpu_blocks=8, block_size=4)
    outputs = ids(13, 14)
    results = await asyncio.gather(run(eng, ids(14, 8), 14, outputs),
                                   run(eng, ids(15, 8), 14, outputs))
    # Each grows to 8 + 13 tokens (6 blocks); two need 12 of the 8 blocks.
    assert [seq.generated for seq, _ in results] == [14, 14]
    assert eng.stats.preemptions_total >= 1
    assert eng.stats.prefix_queries_tokens == 16  # a resumed request is not re-counted
    assert eng.pool.num_free == 8 and eng.running == eng.waiting == 0


async def test_decode_blocks_are_cached_for_the_next_turn() -> None:
    rec = Recorder()
    eng = engine(rec)
    prompt, outputs = ids(16, 16), ids(17, 20)
    await run(eng, prompt, 20, outputs)
    stored = rec.events("BlockStored")
    # KV holds the prompt and all but the last output token: 35 tokens, 2 whole blocks.
    assert [e["token_ids"] for e in stored] == [prompt, outputs[:16]]
    assert stored[1]["parent_block_hash"] == stored[0]["block_hashes"][0]
    hits = eng.stats.prefix_hits_tokens
    await run(eng, prompt + outputs + ids(18, 10), 1)
    assert eng.stats.prefix_hits_tokens - hits == 32


async def test_release_while_waiting_or_running_frees_everything() -> None:
    eng = engine(itl=0.01, max_num_seqs=1)
    first = eng.submit(ids(19, 40), 100, ids(9, 100))
    second = eng.submit(ids(20, 40), 100, ids(9, 100))
    await until(lambda: first.generated >= 1)
    assert eng.running == 1 and eng.waiting == 1
    eng.release(second)
    assert eng.waiting == 0 and eng.stats.aborted_total == 1
    eng.release(first)
    eng.release(first)  # twice is harmless
    assert eng.running == 0 and eng.stats.aborted_total == 2
    assert eng.pool.num_free == eng.pool.num_blocks
    await until(lambda: eng._task is None)


async def test_delayed_request_released_before_it_reaches_the_queue() -> None:
    eng = engine(ttft=5.0)
    seq = eng.submit(ids(21, 20), 5, ids(9, 5))
    assert eng.waiting == 0 and eng.running == 0  # still in its ttft delay
    eng.release(seq)
    # Its ttft timer is cancelled: it can never reach the queue (no sleep needed to see it).
    assert seq.timer is not None and seq.timer.cancelled()
    assert eng.waiting == 0 and eng._task is None and eng.stats.aborted_total == 1


async def test_reset_prefix_cache_is_refused_while_blocks_are_pinned() -> None:
    rec = Recorder()
    eng = engine(rec, itl=0.01)
    busy = asyncio.ensure_future(run(eng, ids(22, 40), 20))
    await until(lambda: eng.running == 1)
    assert eng.reset_prefix_cache() is False
    await busy
    assert eng.pool.num_cached_blocks > 0
    assert eng.reset_prefix_cache() is True
    assert eng.pool.num_cached_blocks == 0
    assert rec.batches[-1] == [{"type": "AllBlocksCleared"}]
    hits = eng.stats.prefix_hits_tokens
    await run(eng, ids(22, 40), 1)
    assert eng.stats.prefix_hits_tokens == hits
