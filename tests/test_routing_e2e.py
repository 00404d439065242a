"""Cache-aware routing end to end: real Ray Serve, simulator processes, the OpenAI SDK."""

from __future__ import annotations

import concurrent.futures
import json
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from vllm_sim.testing import SimulatorProcess, free_port_run

from tests.support import wait_until

MODEL = "sim-model"
SYSTEM = {"role": "system", "content": "You are a meticulous assistant for the routing tests. " * 40}


def ask(gw, question: str, max_tokens: int = 2, system: dict = SYSTEM, **kwargs) -> str:
    """One chat through the gateway; returns the replica that served it."""
    raw = gw.sdk().chat.completions.with_raw_response.create(
        model=MODEL, messages=[system, {"role": "user", "content": question}], max_tokens=max_tokens, **kwargs
    )
    assert raw.http_response.status_code == 200
    assert raw.parse().choices[0].message.content
    return raw.headers["x-gateway-replica"]


def test_requests_sharing_a_prefix_land_on_the_replica_that_holds_it(simulators, gateway) -> None:
    sims = simulators(3)
    gw = gateway([s.url for s in sims])  # the default router
    gw.wait_states({s.url: "READY" for s in sims})
    assert gw.table()["routing"]["default_router"] == "cache_aware"
    served = Counter(ask(gw, f"question number {i}?") for i in range(12))
    assert len(served) == 1, served
    (holder,) = served
    # The holder's simulator did the reuse: 11 of 12 prompts found the system prompt cached.
    sim = next(s for s in sims if s.url == holder)
    stats = httpx.get(sim.url + "/sim/stats", timeout=5).json()
    assert stats["prefix_hits_tokens"] >= 0.8 * stats["prefix_queries_tokens"]
    # Another system prompt is another prefix: it may go anywhere, and then sticks too.
    other = {"role": "system", "content": "An entirely different preamble for another tenant. " * 40}
    second = Counter(ask(gw, f"q{i}", system=other) for i in range(6))
    assert len(second) == 1, second


def test_a_saturated_holder_spreads_its_prefix(simulators, gateway) -> None:
    sims = simulators(2, "--max-num-seqs", "2", "--itl", "0.05")
    gw = gateway([s.url for s in sims])
    gw.wait_states({s.url: "READY" for s in sims})
    holder = ask(gw, "warm up")
    assert ask(gw, "still cached there") == holder
    # Other clients of the holder (say, another gateway) fill its two slots and queue two more.
    payload = {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": "tell a long story"}],
               "max_tokens": 100, "stream": True}

    def long_stream() -> bytes:
        with httpx.stream("POST", holder + "/v1/chat/completions", json=payload, timeout=60) as resp:
            assert resp.status_code == 200
            return b"".join(resp.iter_raw())

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(long_stream) for _ in range(4)]

        def holder_seen_saturated() -> bool:
            row = next(r for r in gw.table()["replicas"] if r["replica_id"] == holder)
            load = row["load"] or {}
            return load.get("slots") == 2 and load.get("waiting", 0) > 0

        wait_until(holder_seen_saturated, 20, "the gateway to see the holder queueing")
        # Waiting behind the holder's queue now costs more than a cold prefill elsewhere.
        spread = ask(gw, "a new question with the same preamble")
        assert spread != holder
        assert all(f.result(timeout=60).endswith(b"data: [DONE]\n\n") for f in streams)
    # Idle again: both replicas now hold the prefix, and it stays on one of them.
    wait_until(lambda: all((r["load"] or {}).get("running", 1) == 0 for r in gw.table()["replicas"]), 20, "idle")
    assert ask(gw, "and one more") in {holder, spread}


@pytest.fixture
def event_simulators() -> Iterator[Callable[[int, int], list[SimulatorProcess]]]:
    """Simulators that publish KV events at their HTTP port + offset; stopped by PID."""
    started: list[SimulatorProcess] = []

    def start(count: int, offset: int) -> list[SimulatorProcess]:
        for _ in range(count):
            port = free_port_run(offset + 2)  # HTTP, ..., events at + offset, replay at + offset + 1
            events = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{port + offset}",
                      "replay_endpoint": f"tcp://*:{port + offset + 1}"}
            sim = SimulatorProcess(["--model", MODEL, "--ttft", "0.01", "--itl", "0.002",
                                    "--kv-events-config", json.dumps(events)], port=port)
            started.append(sim)
            sim.start()
        for sim in started:
            sim.wait_ready(timeout=30)
        return started

    yield start
    for sim in started:
        sim.stop()


def test_precise_mode_follows_kv_events_with_several_ingress_replicas(event_simulators, gateway) -> None:
    offset = 7  # each simulator publishes at its HTTP port + 7 (replay at + 8)
    sims = event_simulators(3, offset)
    gw = gateway(
        [s.url for s in sims],
        ingress_replicas=2,
        routing={"tokenizer": {"kind": "vllm_sim"}, "kv_events": {"enabled": True, "port_offset": offset}},
    )
    gw.wait_states({s.url: "READY" for s in sims})
    table = gw.table()
    assert table["routing"]["prefix_index"].startswith("precise")
    # Place the prefix directly on one replica, behind the gateway's back: only its
    # KV events can tell the gateway where it is.
    target = sims[1]
    warm = httpx.post(target.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [SYSTEM, {"role": "user", "content": "warm"}], "max_tokens": 2})
    assert warm.status_code == 200

    def every_ingress_knows() -> bool:
        tables = [gw.table() for _ in range(8)]  # requests reach both ingress replicas
        seen = {t["ingress_replica"]: t for t in tables}
        return len(seen) == 2 and all(
            next(r for r in t["replicas"] if r["replica_id"] == target.url)["prefix_index_blocks"] > 0
            for t in seen.values()
        )

    wait_until(every_ingress_knows, 20, "both ingress replicas to learn the target's blocks from its events")
    served = Counter(ask(gw, f"question {i}") for i in range(10))
    assert served == {target.url: 10}


def test_approximate_mode_ingress_replicas_share_their_placements(simulators, gateway) -> None:
    sims = simulators(3)
    gw = gateway([s.url for s in sims], ingress_replicas=2)
    gw.wait_states({s.url: "READY" for s in sims})
    assert gw.table()["routing"]["prefix_index"].startswith("approximate")
    holder = ask(gw, "first question")

    def every_ingress_knows() -> bool:
        seen = {t["ingress_replica"]: t for t in (gw.table() for _ in range(8))}
        return len(seen) == 2 and all(
            next(r for r in t["replicas"] if r["replica_id"] == holder)["prefix_index_blocks"] > 0
            for t in seen.values()
        )

    # Whichever ingress replica placed it, the other learns it (through the health actor).
    wait_until(every_ingress_knows, 20, "both ingress replicas to know where the prefix went")
    served = Counter(ask(gw, f"question {i}") for i in range(10))
    assert served == {holder: 10}
