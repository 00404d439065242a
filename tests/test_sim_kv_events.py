"""KV cache events on vLLM's wire format, read by plain consumers and by vllm-router.

(a) A ZeroMQ SUB socket and msgpack, decoding into vLLM's shapes: BlockStored for a
request's blocks (chained parents, the tokenizer's ids), BlockRemoved on eviction,
AllBlocksCleared on reset, replay of missed batches by sequence number.
(b) vllm-router's kv_aware policy, fed by two simulators' events, sends a repeated long
prompt to the replica that holds it (skipped when vllm-router is not installed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from vllm_sim.hashing import block_hashes
from vllm_sim.testing import SimulatorProcess, free_port
from vllm_sim.tokenizer import prompt_token_ids_for_completion

zmq = pytest.importorskip("zmq", reason="pyzmq is needed to consume KV events")
msgpack = pytest.importorskip("msgpack", reason="msgpack is needed to decode KV events")

pytestmark = pytest.mark.timeout(90)

MODEL = "sim-model"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def words(count: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(count))


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def events_config(pub: int, replay: int | None = None, topic: str = "") -> str:
    config: dict[str, Any] = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub}",
                              "topic": topic}
    if replay is not None:
        config["replay_endpoint"] = f"tcp://*:{replay}"
    return json.dumps(config)


class Subscriber:
    """A plain SUB socket decoding vLLM's `[topic, seq, payload]` messages."""

    def __init__(self, port: int, topic: bytes = b"") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.messages: list[tuple[bytes, int, bytes, list[Any]]] = []

    def drain(self, timeout_ms: int = 0) -> list[tuple[bytes, int, bytes, list[Any]]]:
        new = []
        while self.sock.poll(timeout_ms):
            topic, seq, payload = self.sock.recv_multipart()
            message = (topic, int.from_bytes(seq, "big"), payload, msgpack.unpackb(payload))
            new.append(message)
            timeout_ms = 50  # a batch may be followed by the rest of its request's batches
        self.messages.extend(new)
        return new

    def catch_up(self, sim: SimulatorProcess) -> list[tuple[bytes, int, bytes, list[Any]]]:
        """Receive until the simulator's latest batch has arrived (a busy machine can delay
        delivery; the simulator's own count says how many were sent)."""
        last = sim.stats()["kv_event_batches_total"] - 1
        new: list[tuple[bytes, int, bytes, list[Any]]] = []

        def arrived() -> bool:
            new.extend(self.drain(20))
            return bool(self.messages) and self.messages[-1][1] >= last

        wait_until(arrived, what=f"KV event batch {last}")
        return new

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for *_, batch in self.messages for e in batch[1] if e["type"] == kind]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def connect(sim: SimulatorProcess, port: int, topic: bytes = b"") -> Subscriber:
    """Subscribe, then send tiny requests until one's events arrive (ZeroMQ's slow joiner).

    The batch that arrives may be an earlier attempt's that was merely slow, so finish by
    catching up with every batch sent so far: none of the joining requests' batches can
    then turn up among what the test itself receives next.
    """
    sub = Subscriber(port, topic)
    attempt = 0

    def joined() -> bool:
        nonlocal attempt
        attempt += 1
        httpx.post(sim.url + "/v1/completions",
                   json={"prompt": words(16, f"join{attempt}_"), "max_tokens": 1})
        return bool(sub.drain(200))

    wait_until(joined, what="the first KV event batch")
    sub.catch_up(sim)
    return sub


@pytest.fixture
def spawn() -> Iterator[Callable[..., SimulatorProcess]]:
    started: list[SimulatorProcess] = []

    def _spawn(*args: str) -> SimulatorProcess:
        sim = SimulatorProcess(["--model", MODEL, "--ttft", "0", "--itl", "0", *args])
        started.append(sim)
        return sim.start().wait_ready()

    yield _spawn
    for sim in started:
        sim.close()


def complete(sim: SimulatorProcess, prompt: str, max_tokens: int = 1) -> dict[str, Any]:
    reply = httpx.post(sim.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})
    assert reply.status_code == 200, reply.text
    return reply.json()


# ----- (a) the wire format -----------------------------------------------------------------


def test_block_stored_carries_the_prompt_blocks_on_vllms_wire_format(spawn) -> None:
    pub = free_port()
    sim = spawn("--kv-events-config", events_config(pub, topic="kv"))
    sub = connect(sim, pub, b"kv")
    try:
        prompt = words(40, "a")
        ids = prompt_token_ids_for_completion(prompt)
        sent_at = time.time()
        complete(sim, prompt)
        (topic, seq, payload, batch), = sub.catch_up(sim)
        received_at = time.time()
        assert topic == b"kv" and seq == sub.messages[-2][1] + 1  # consecutive numbers

        ts, events, rank = batch  # EventBatch is array_like: [ts, events, dp_rank]
        # Wall-clock seconds, stamped while the request ran (however slowly).
        assert isinstance(ts, float) and sent_at <= ts <= received_at and rank == 0
        (stored,) = events
        hashes = block_hashes(ids, 16)
        assert stored == {
            "type": "BlockStored",  # the msgspec tag, first
            "block_hashes": hashes,  # 40 tokens: 2 whole blocks; the rest is not cached
            "parent_block_hash": None,
            "token_ids": ids[:32],
            "block_size": 16,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "extra_keys": [None, None],
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        }
        assert list(stored) == list(stored.keys())  # (field order is vLLM's)
        assert all(0 <= h < 2**64 for h in hashes)

        # A longer prompt with the same start stores only its new blocks, chained.
        longer = prompt_token_ids_for_completion(words(40, "a") + " " + words(30, "b"))
        complete(sim, words(40, "a") + " " + words(30, "b"))
        (_, _, _, (_, (more,), _)), = sub.catch_up(sim)
        assert more["parent_block_hash"] == hashes[-1]
        assert more["block_hashes"] == block_hashes(longer, 16)[2:]
        assert more["token_ids"] == longer[32:64]
    finally:
        sub.close()


def test_eviction_sends_block_removed_and_reset_sends_all_blocks_cleared(spawn) -> None:
    pub = free_port()
    # 16 blocks of 16 tokens: a few distinct prompts push the oldest blocks out.
    sim = spawn("--num-gpu-blocks", "16", "--max-model-len", "256",
                "--kv-events-config", events_config(pub))
    sub = connect(sim, pub)
    try:
        first = prompt_token_ids_for_completion(words(64, "first"))
        complete(sim, words(64, "first"))  # 4 blocks, cached after it finishes
        for k in range(3):
            complete(sim, words(100, f"next{k}_"))
        sub.catch_up(sim)
        removed = [h for e in sub.events("BlockRemoved") for h in e["block_hashes"]]
        stored = {h for e in sub.events("BlockStored") for h in e["block_hashes"]}
        assert removed and set(removed) <= stored  # only blocks announced before
        first_hashes = block_hashes(first, 16)
        evicted_first = [h for h in removed if h in first_hashes]
        assert evicted_first and evicted_first == first_hashes[::-1][: len(evicted_first)]
        assert all(e == {"type": "BlockRemoved", "block_hashes": e["block_hashes"],
                         "medium": "GPU", "group_idx": 0} for e in sub.events("BlockRemoved"))
        assert sim.stats()["evicted_blocks_total"] == len(removed)

        assert httpx.post(sim.url + "/reset_prefix_cache").status_code == 200
        (*_, (_, events, _)), = sub.catch_up(sim)
        assert events == [{"type": "AllBlocksCleared"}]
    finally:
        sub.close()


def test_replay_socket_returns_missed_batches_by_sequence_number(spawn) -> None:
    pub, replay = free_port(), free_port()
    sim = spawn("--kv-events-config", events_config(pub, replay, topic="t"))
    sub = connect(sim, pub)
    for k in range(3):
        complete(sim, words(32, f"r{k}_"))
    sub.catch_up(sim)
    live = {seq: payload for _, seq, payload, _ in sub.messages}
    sub.close()
    last = max(live)
    # Consecutive numbers (a slow joiner may have missed the very first batches).
    assert sorted(live) == list(range(min(live), last + 1))
    assert sim.stats()["kv_event_batches_total"] == last + 1

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{replay}")
    try:
        def ask(start: int) -> dict[int, bytes]:
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            got: dict[int, bytes] = {}
            while True:
                assert dealer.poll(30_000), "no replay answer"
                frames = dealer.recv_multipart()
                # [empty, topic, seq, payload]; the end marker is [empty, b"", -1, b""].
                assert frames[0] == b"" and len(frames) == 4
                if frames[2] == END_SEQ:
                    assert frames[1] == b"" and frames[3] == b""
                    return got
                assert frames[1] == b"t"
                got[int.from_bytes(frames[2], "big")] = frames[3]

        replayed = ask(0)
        assert sorted(replayed) == list(range(last + 1))  # everything since seq 0
        assert all(replayed[seq] == payload for seq, payload in live.items())  # byte for byte
        assert ask(last - 1) == {last - 1: live[last - 1], last: live[last]}
        assert ask(last + 1) == {}
    finally:
        dealer.close()
        ctx.term()


def replay_from(port: int, start: int) -> dict[int, bytes]:
    """Ask a replay socket for every batch from `start`; {seq: payload} until the end marker."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        got: dict[int, bytes] = {}
        while True:
            assert dealer.poll(30_000), "no replay answer"
            frames = dealer.recv_multipart()
            if frames[-2] == END_SEQ:
                return got
            got[int.from_bytes(frames[-2], "big")] = frames[-1]
    finally:
        dealer.close()
        ctx.term()


def test_restarted_simulator_starts_at_sequence_zero_with_an_empty_cache(spawn) -> None:
    pub, replay = free_port(), free_port()
    sim = spawn("--kv-events-config", events_config(pub, replay))
    prompt = words(48, "keep")
    for _ in range(2):
        complete(sim, prompt)
    assert sim.stats()["prefix_hits_tokens"] == 32
    assert len(replay_from(replay, 0)) == sim.stats()["kv_event_batches_total"] >= 1

    sim.restart()  # same ports
    assert sim.stats()["kv_event_batches_total"] == 0
    complete(sim, prompt)
    assert sim.stats()["prefix_hits_tokens"] == 0  # the cache did not survive
    batches = replay_from(replay, 0)
    assert sorted(batches) == [0]  # numbering restarted
    (stored,) = msgpack.unpackb(batches[0])[1]
    assert stored["type"] == "BlockStored" and stored["parent_block_hash"] is None


# ----- (b) vllm-router's kv_aware policy reads these events ----------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _router_binary() -> str | None:
    return shutil.which("vllm-router")


@pytest.mark.skipif(_router_binary() is None,
                    reason="vllm-router is not installed (pip install vllm-router==0.1.17)")
def test_vllm_router_kv_aware_routes_a_prompt_to_the_replica_that_holds_it(spawn) -> None:
    pubs = [free_port(), free_port()]
    sims = [spawn("--kv-events-config", events_config(port)) for port in pubs]
    router_port = free_port()
    command = [
        _router_binary(), "--host", "127.0.0.1", "--port", str(router_port),
        "--worker-urls", *(s.url for s in sims), "--policy", "kv_aware",
        "--kv-event-block-size", "16", "--kv-event-model", MODEL, "--log-level", "debug",
        # Health checks every minute: none lands in the middle of the measurement.
        "--health-check-interval-secs", "60",
    ]
    for sim, port in zip(sims, pubs):
        command += ["--kv-event-source", f"{sim.url}=tcp://127.0.0.1:{port}"]
    log = tempfile.NamedTemporaryFile(prefix="vllm-router-", suffix=".log", delete=False)
    log_path = Path(log.name)
    router = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    log.close()
    base = f"http://127.0.0.1:{router_port}"

    def router_log() -> str:
        return ANSI.sub("", log_path.read_text(errors="replace"))

    def healthy() -> bool:
        assert router.poll() is None, router_log()[-3000:]
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def indexed(sim: SimulatorProcess) -> bool:
        """The router applied this simulator's latest batch."""
        last = sim.stats()["kv_event_batches_total"] - 1
        return f"source={sim.url} rank=0 seq={last}" in router_log()

    def served(sim: SimulatorProcess) -> int:
        return sim.stats()["by_path"].get("/v1/completions", 0)

    try:
        wait_until(healthy, timeout=60, what="vllm-router /health")
        prompts = [words(200, "alpha"), words(200, "beta")]
        # Each replica gets its own long prompt directly, so each holds a different one:
        # the holder is the second candidate for one of them, so order cannot decide.
        for sim, prompt in zip(sims, prompts):
            complete(sim, prompt)
        for sim in sims:
            # The router subscribed after start-up; it must have applied the warm-up batch.
            wait_until(lambda: indexed(sim), what=f"router indexed {sim.url}")
        before = [served(s) for s in sims]
        for prompt, holder in ((prompts[0], 0), (prompts[1], 1)) * 3:
            reply = httpx.post(base + "/v1/completions", timeout=30,
                               json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
            assert reply.status_code == 200, reply.text
        after = [served(s) for s in sims]
        assert [a - b for a, b in zip(after, before)] == [3, 3], router_log()[-4000:]
        # The router saw the cached prefix in blocks: 12 whole blocks of the 200 tokens.
        assert "credited_prefix_tokens=192" in router_log()
        assert "kv_index decode batch" not in router_log()  # every batch decoded
    finally:
        router.terminate()
        try:
            router.wait(15)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait(5)
        log_path.unlink(missing_ok=True)
