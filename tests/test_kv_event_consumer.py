"""The gateway's KV-event consumer against the simulator as a real process (vLLM's wire format)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from routers import PrefixIndex
from routers.prefix import token_blocks
from serve_app.config import KVEvents
from serve_app.ingress.kv_events import KVEventConsumer
from vllm_sim.testing import SimulatorProcess, free_port_run
from vllm_sim.tokenizer import prompt_token_ids_for_chat

MODEL = "sim-model"


def events_sim(http_port: int, offset: int) -> SimulatorProcess:
    """A simulator publishing KV events at http port + offset, replay at + offset + 1."""
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{http_port + offset}",
        "replay_endpoint": f"tcp://*:{http_port + offset + 1}",
    }
    return SimulatorProcess(
        ["--model", MODEL, "--ttft", "0", "--itl", "0", "--kv-events-config", json.dumps(config)], port=http_port
    )


def messages(topic: str) -> list[dict]:
    return [{"role": "system", "content": f"{topic} " * 200}, {"role": "user", "content": "go"}]


def keys_of(topic: str) -> list[int]:
    return token_blocks(prompt_token_ids_for_chat(messages(topic)), 16)


async def chat(sim: SimulatorProcess, topic: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(sim.url + "/v1/chat/completions",
                                 json={"model": MODEL, "messages": messages(topic), "max_tokens": 2})
        assert resp.status_code == 200


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def offset_and_port():
    offset = 3  # events at the HTTP port + 3, replay at + 4
    return free_port_run(offset + 2), offset


@pytest.mark.asyncio
async def test_events_arrive_late_joiners_replay_and_restarts_clear(offset_and_port) -> None:
    port, offset = offset_and_port
    sim = events_sim(port, offset)
    sim.start().wait_ready(timeout=30)
    index = PrefixIndex(100_000)
    consumer = KVEventConsumer(KVEvents(enabled=True, port_offset=offset), index)
    try:
        # Published before anyone listened: only the replay socket still has it.
        await chat(sim, "alpha")
        consumer.sync([(sim.url, sim.url)])
        alpha = keys_of("alpha")
        # The next batch shows a gap from 0: the consumer replays what it missed.
        await chat(sim, "beta")
        beta = keys_of("beta")
        await until(lambda: index.match(beta).get(sim.url) == len(beta), 10, "beta's blocks from the live stream")
        assert index.match(alpha).get(sim.url) == len(alpha)
        status = consumer.status(sim.url)
        assert status["replays"] >= 1 and status["replayed_batches"] >= 1 and status["unknown_parents"] == 0

        # The cache is reset: AllBlocksCleared empties the replica's entries.
        async with httpx.AsyncClient() as client:
            assert (await client.post(sim.url + "/reset_prefix_cache")).status_code == 200
        await until(lambda: index.blocks_of(sim.url) == 0, 10, "AllBlocksCleared")

        # A restarted replica starts from sequence 0 with an empty cache: what we knew goes.
        await chat(sim, "gamma")
        gamma = keys_of("gamma")
        await until(lambda: index.match(gamma).get(sim.url) == len(gamma), 10, "gamma")
        sim.restart().wait_ready(timeout=30)
        # The subscriber reconnects by itself, but batches published before it has may be
        # missed: a gap (or a restart) is noticed at the next batch that arrives, which
        # then replays the missed ones. So: two requests after the restart.
        await chat(sim, "delta")
        delta = keys_of("delta")
        deadline = time.monotonic() + 20
        n = 0
        while True:  # keep the replica publishing until the resubscribed consumer hears it
            n += 1
            await chat(sim, f"epsilon {n}")
            epsilon = keys_of(f"epsilon {n}")
            if consumer.status(sim.url)["restarts_seen"] == 1:
                await until(lambda: index.match(epsilon).get(sim.url) == len(epsilon), 15, "epsilon after the restart")
                break
            assert time.monotonic() < deadline, "the consumer never heard the restarted replica"
            await asyncio.sleep(0.2)
        assert index.match(delta).get(sim.url) == len(delta)  # replayed if it was missed
        assert index.match(gamma) == {}
        assert consumer.status(sim.url)["restarts_seen"] == 1
    finally:
        consumer.close()
        sim.stop()


@pytest.mark.asyncio
async def test_evictions_reach_the_index(offset_and_port) -> None:
    port, offset = offset_and_port
    config = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{port + offset}",
              "replay_endpoint": f"tcp://*:{port + offset + 1}"}
    # Room for about one 200-word prompt (13 blocks of 16): the next one evicts it.
    sim = SimulatorProcess(["--model", MODEL, "--ttft", "0", "--itl", "0", "--num-gpu-blocks", "20",
                            "--max-model-len", "300", "--kv-events-config", json.dumps(config)], port=port)
    sim.start().wait_ready(timeout=30)
    index = PrefixIndex(100_000)
    consumer = KVEventConsumer(KVEvents(enabled=True, port_offset=offset), index)
    try:
        consumer.sync([(sim.url, sim.url)])
        await asyncio.sleep(0)  # let the subscriber start before the first batch
        await chat(sim, "one")
        one = keys_of("one")
        await until(lambda: index.match(one).get(sim.url) == len(one), 10, "one's blocks")
        await chat(sim, "two")
        two = keys_of("two")
        await until(lambda: index.match(two).get(sim.url) == len(two), 10, "two's blocks")
        await until(lambda: index.match(one).get(sim.url, 0) < len(one), 10, "one's blocks evicted")
    finally:
        consumer.close()
        sim.stop()


@pytest.mark.asyncio
async def test_a_long_replay_arrives_whole() -> None:
    """Joining a replica that has published thousands of batches: its replay socket (a
    ZeroMQ ROUTER, as in vLLM) sends them all at once and drops what does not fit in the
    pipe to us. Every batch and the end marker must arrive, so nothing is keyed without
    its parent. A real ROUTER socket stands in for the replica's (the simulator would take
    minutes of requests to fill its buffer)."""
    import msgpack
    import zmq
    import zmq.asyncio

    from serve_app.ingress.kv_events import END_SEQ, ReplicaEvents

    port = free_port_run(2)  # the replay socket binds port + 1
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port + 1}")
    batches = 30000  # vLLM buffers 10,000 by default (buffer_steps); under load fewer overflow
    tokens = list(range(1, 16 * batches + 1))
    hashes = list(range(1000, 1000 + batches))

    def payload(i: int) -> bytes:
        stored = {"type": "BlockStored", "block_hashes": [hashes[i]], "parent_block_hash": hashes[i - 1] if i else None,
                  "token_ids": tokens[16 * i : 16 * (i + 1)], "block_size": 16, "lora_id": None, "medium": "GPU"}
        return msgpack.packb([time.time(), [stored], 0])

    async def serve() -> None:
        client, _, _start = await router.recv_multipart()
        for i in range(batches):  # as vLLM does: every buffered batch, then the end marker, no waiting
            await router.send_multipart((client, b"", b"kv-events", i.to_bytes(8, "big"), payload(i)))
        await router.send_multipart((client, b"", b"", END_SEQ.to_bytes(8, "big", signed=True), b""))

    index = PrefixIndex(1 << 20)
    config = KVEvents(enabled=True, port=port, replay=True, block_size=16)
    stream = ReplicaEvents("r", f"http://127.0.0.1:{port - 1}", config, index, ctx, max_entries=1 << 20)
    server = asyncio.create_task(serve())
    try:
        await stream.replay(0, 1 << 62)
    finally:
        await asyncio.wait_for(server, 10)
        router.close(linger=0)
        ctx.destroy(linger=0)
    assert stream.status.errors == []
    assert stream.status.replayed_batches == batches
    assert stream.blocks.unknown_parents == 0
    assert index.blocks_of("r") == batches
