"""The control plane's load scraper: fresh samples from hundreds of replicas, bounded concurrency."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from serve_app.control.load_metrics import parse_load
from serve_app.control.load_metrics import ReplicaLoad
from serve_app.control.load_scraper import SATURATED_AFTER_S, SCRAPE_CONCURRENCY, LoadScraper

METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} 0.25
vllm:cache_config_info{{block_size="16",cache_dtype="auto",num_gpu_blocks="300",enable_prefix_caching="True"}} 1.0
"""


def test_parse_load_reads_the_cache_size() -> None:
    load = parse_load(METRICS.format(running=3, waiting=1))
    assert (load.running, load.waiting, load.kv_cache_usage, load.cache_tokens) == (3, 1, 0.25, 4800)


def test_slots_are_learned_from_a_lasting_queue_not_from_one_long_step() -> None:
    """A cold prompt's prefill can fill a step's token budget for longer than a scrape
    interval: the request behind it waits with slots free (running 1, waiting 1 in two
    samples in a row). Taking that as "1 slot" made a busy-looking holder lose its prefix."""
    clock = {"now": 100.0}
    scraper = LoadScraper("epoch", interval_s=0.2, clock=lambda: clock["now"])

    def round_(running: int, waiting: int) -> int | None:
        scraper.apply({"r": ReplicaLoad(running, waiting, 0.5, 4800)})
        clock["now"] += 0.2
        return scraper.current().samples["r"].slots

    assert [round_(1, 1) for _ in range(3)] == [None, None, None]  # one 0.6 s step: not saturation
    assert round_(2, 0) is None
    seen = [round_(4, 2) for _ in range(int(SATURATED_AFTER_S / 0.2) + 2)]
    assert seen[0] is None and seen[-1] == 4  # a queue that lasts: the slots are full


@pytest.mark.asyncio
async def test_hundreds_of_replicas_every_100ms_with_bounded_concurrency() -> None:
    """300 replicas (one real HTTP server, one path each): rounds keep to ~100 ms, at most
    SCRAPE_CONCURRENCY scrapes at once, a hung replica keeps its last sample (ageing) and
    does not hold up the others, and a replica seen queueing reveals its slots."""
    state = {"now": 0, "max_now": 0, "hang": False, "r5": 0}

    async def metrics(request: web.Request) -> web.Response:
        rid = int(request.match_info["rid"])
        state["now"] += 1
        state["max_now"] = max(state["max_now"], state["now"])
        try:
            if rid == 7 and state["hang"]:
                await asyncio.sleep(1.0)  # longer than a scrape may take (2 intervals)
            await asyncio.sleep(0.002)  # a little server time, so scrapes overlap
            running, waiting = (4, 2) if rid == 3 else (rid % 3, 0)
            if rid == 5:  # a request caught between steps now and then: not a full replica
                state["r5"] += 1
                running, waiting = 1, state["r5"] % 2
            return web.Response(text=METRICS.format(running=running, waiting=waiting))
        finally:
            state["now"] -= 1

    app = web.Application()
    app.router.add_get("/r{rid}/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    targets = [(f"r{i}", f"http://127.0.0.1:{port}/r{i}") for i in range(300)]
    scraper = LoadScraper("epoch", interval_s=0.1)
    task = asyncio.create_task(scraper.run(lambda: targets))
    try:
        first = await scraper.since("epoch", 0, timeout_s=10)  # the first round
        assert first is not None and len(first.samples) == 300
        started = time.monotonic()
        version = first.version
        for _ in range(10):
            update = await scraper.since("epoch", version, timeout_s=5)
            assert update is not None
            version = update.version
        per_round = (time.monotonic() - started) / 10
        print(f"300 replicas: {per_round * 1000:.0f} ms per round")
        assert per_round < 1.0  # ~0.1 s on an idle machine; generous for a busy one
        assert state["max_now"] <= SCRAPE_CONCURRENCY
        deadline = time.monotonic() + 10  # r3 queues in every sample: saturated after SATURATED_AFTER_S
        while update.samples["r3"].slots is None and time.monotonic() < deadline:
            update = await scraper.since("epoch", update.version, timeout_s=5)
            assert update is not None
        sample = update.samples["r3"]
        assert (sample.running, sample.waiting, sample.slots, sample.cache_tokens) == (4, 2, 4, 4800)
        assert update.samples["r1"].slots is None  # never seen saturated: unknown
        assert update.samples["r5"].slots is None  # a queue in one sample only is not saturation

        state["hang"] = True
        hung_at = update.samples["r7"].scraped_at
        for _ in range(5):
            update = await scraper.since("epoch", update.version, timeout_s=5)
            assert update is not None
        assert update.samples["r7"].scraped_at == hung_at  # kept, ageing
        assert update.samples["r8"].scraped_at > hung_at  # the others moved on
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
