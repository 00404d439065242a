"""The simulator's new HTTP surface: render, prefix-cache reset, cache figures, flags.

Real simulator processes on loopback ports, as in test_simulator.py. A state the test
inspects is held by a stream that would run for minutes and that the test ends itself;
wall-clock figures are only lower bounds counted from before the request was sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from vllm_sim.hashing import block_hashes
from vllm_sim.testing import SimulatorProcess, metric_value
from vllm_sim.tokenizer import prompt_token_ids_for_chat, prompt_token_ids_for_completion

pytestmark = pytest.mark.timeout(60)

MODEL = "sim-model"
MESSAGES = [{"role": "user", "content": "Tell me about blocks and caches, please."}]


@pytest.fixture
def spawn() -> Iterator[Callable[..., SimulatorProcess]]:
    """Start a dedicated simulator; every one is stopped by PID at teardown."""
    started: list[SimulatorProcess] = []

    def _spawn(*args: str, wait: bool = True) -> SimulatorProcess:
        sim = SimulatorProcess(["--model", MODEL, *args])
        started.append(sim)
        sim.start()
        if wait:
            sim.wait_ready()
        return sim

    yield _spawn
    for sim in started:
        sim.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def words(count: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(count))


def test_render_returns_the_token_ids_the_engine_caches(spawn) -> None:
    sim = spawn("--ttft", "0", "--itl", "0", "--max-model-len", "64")
    completion = httpx.post(sim.url + "/v1/completions/render",
                            headers={"x-request-id": "r1"},
                            json={"model": MODEL, "prompt": "a b  c", "max_tokens": 5})
    assert completion.status_code == 200
    (item,) = completion.json()  # completions: a list, one entry per prompt
    assert item["token_ids"] == prompt_token_ids_for_completion("a b  c")
    assert item["request_id"] == "cmpl-r1" and item["model"] == MODEL
    assert item["sampling_params"]["max_tokens"] == 5

    chat = httpx.post(sim.url + "/v1/chat/completions/render",
                      json={"model": MODEL, "messages": MESSAGES}).json()
    assert isinstance(chat, dict)  # chat: one object
    assert chat["token_ids"] == prompt_token_ids_for_chat(MESSAGES)
    assert chat["request_id"].startswith("chatcmpl-")

    ids = httpx.post(sim.url + "/v1/completions/render",
                     json={"prompt": [3, 1, 2]}).json()[0]["token_ids"]
    assert ids == [3, 1, 2]
    assert httpx.post(sim.url + "/v1/completions/render",
                      json={"model": "nope", "prompt": "x"}).status_code == 404
    too_long = httpx.post(sim.url + "/v1/completions/render", json={"prompt": words(80)})
    assert too_long.status_code == 400
    assert httpx.post(sim.url + "/v1/completions/render",
                      json={"prompt": [-1]}).status_code == 400
    # Rendering generates nothing.
    stats = sim.stats()
    assert stats["by_path"]["/v1/completions/render"] == 5
    assert stats["completed_total"] == 0 and stats["steps_total"] == 0


def test_stats_and_metrics_expose_the_cache(spawn) -> None:
    sim = spawn("--ttft", "0", "--itl", "0", "--prefix-cache-blocks", "300", "--block-size", "16")
    prompt = words(40)
    for _ in range(2):
        assert httpx.post(sim.url + "/v1/completions",
                          json={"prompt": prompt, "max_tokens": 1}).status_code == 200
    stats = sim.stats()
    assert stats["num_gpu_blocks"] == 300 and stats["block_size"] == 16
    assert stats["prefix_queries_tokens"] == 80
    assert stats["prefix_hits_tokens"] == 32  # 2 whole blocks; the last token is recomputed
    assert stats["cached_blocks"] == 2
    assert stats["free_blocks"] == 300 and stats["used_blocks"] == 0
    assert stats["kv_cache_usage"] == 0 and stats["preemptions_total"] == 0
    assert stats["prefill_tokens_total"] == 40 + 8  # the second computed only the last block

    text = sim.metrics_text()
    assert metric_value(text, "vllm:prefix_cache_queries_total", model_name=MODEL) == 80
    assert metric_value(text, "vllm:prefix_cache_hits_total", model_name=MODEL) == 32
    assert metric_value(text, "vllm:cache_config_info", block_size="16", num_gpu_blocks="300",
                        enable_prefix_caching="True", engine="0") == 1
    assert metric_value(text, "vllm:num_preemptions_total", model_name=MODEL) == 0


def test_kv_cache_usage_is_the_share_of_pinned_blocks(spawn) -> None:
    # Slow steps: the block count cannot change while the test looks (the next block is
    # needed 15 decode steps later: 150 s); the test ends the stream itself.
    sim = spawn("--ttft", "0", "--itl", "10", "--num-gpu-blocks", "100",
                "--max-model-len", "1000")
    payload = {"prompt": words(160), "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", sim.url + "/v1/completions", json=payload, timeout=30) as response:
        chunks = response.iter_bytes()
        assert next(chunks).startswith(b"data: ")
        # The step after the first token holds 160 prompt tokens + 1: 11 blocks of 100.
        assert sim.stats()["used_blocks"] == 11
        assert sim.metric("vllm:kv_cache_usage_perc") == pytest.approx(0.11)
    wait_until(lambda: sim.stats()["running"] == 0, what="request aborted")
    assert sim.metric("vllm:kv_cache_usage_perc") == 0


def test_preemptions_are_counted(spawn) -> None:
    # 4 blocks of 256 tokens. A holder stream pins 3 of them (a 513-token prompt) and would
    # run for 51 s, so two requests of 512 prompt tokens (2 blocks each) queue behind it
    # however their threads are scheduled. When the test ends the holder, both are admitted
    # in the same step and fill the cache; the older one's next token needs a third block,
    # so the newer one is preempted. It can only come back once the older one has finished:
    # exactly one preemption.
    sim = spawn("--ttft", "0", "--itl", "0.1", "--block-size", "256", "--num-gpu-blocks", "4",
                "--max-model-len", "1024", "--max-num-seqs", "4")

    def one(tag: str) -> int:
        reply = httpx.post(sim.url + "/v1/completions", timeout=60,
                           json={"prompt": words(512, tag), "max_tokens": 4, "ignore_eos": True})
        return reply.status_code

    hold = {"prompt": words(513, "h"), "max_tokens": 511, "ignore_eos": True, "stream": True}
    holder_client = httpx.Client(timeout=30)
    with ThreadPoolExecutor(max_workers=2) as pool:
        holder: httpx.Response | None = None
        try:
            holder = holder_client.send(holder_client.build_request(
                "POST", sim.url + "/v1/completions", json=hold), stream=True)
            chunks = holder.iter_bytes()  # keep a reference: dropping it closes the stream
            assert next(chunks).startswith(b"data: ")
            futures = [pool.submit(one, f"t{k}_") for k in range(2)]

            def queued() -> dict[str, Any] | None:
                finished = [f.result() for f in futures if f.done()]  # raises a thread's error
                assert not finished, f"answered while the holder pinned the cache: {finished}"
                stats = sim.stats()
                return stats if stats["waiting"] == 2 else None

            stats = wait_until(queued, what="both requests waiting for blocks")
            assert stats["running"] == 1 and stats["free_blocks"] <= 1
            assert stats["preemptions_total"] == 0
        finally:
            if holder is not None:
                holder.close()  # the holder leaves (aborted): its blocks become free
            holder_client.close()
        statuses = [f.result(timeout=60) for f in futures]
    assert statuses == [200, 200]
    stats = sim.stats()
    assert stats["preemptions_total"] == 1 and stats["max_seen_running"] == 2
    assert stats["completed_total"] == 2 and stats["aborted_total"] == 1
    # The preempted request recomputed at least its last prompt token.
    assert stats["prefill_tokens_total"] > 513 + 2 * 512
    assert sim.metric("vllm:num_preemptions_total") == 1


def test_reset_prefix_cache_route(spawn) -> None:
    sim = spawn("--ttft", "0", "--itl", "0.05")
    prompt = words(40)
    httpx.post(sim.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert sim.stats()["cached_blocks"] == 2
    # 4000 tokens x 50 ms: still running (holding blocks) until the test closes it.
    payload = {"prompt": words(40, "x"), "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", sim.url + "/v1/completions", json=payload, timeout=30) as response:
        chunks = response.iter_bytes()  # keep a reference: dropping it closes the stream
        assert next(chunks).startswith(b"data: ")
        busy = httpx.post(sim.url + "/reset_prefix_cache")
        assert busy.status_code == 409  # running requests hold blocks (vLLM refuses too)
        assert busy.json()["error"]["code"] == 409
    wait_until(lambda: sim.stats()["running"] == 0, what="stream aborted")
    assert httpx.post(sim.url + "/reset_prefix_cache").status_code == 200
    assert sim.stats()["cached_blocks"] == 0
    hits = sim.stats()["prefix_hits_tokens"]
    httpx.post(sim.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert sim.stats()["prefix_hits_tokens"] == hits


def test_lone_streamed_request_timing_over_http(spawn) -> None:
    sim = spawn("--ttft", "0.05", "--itl", "0.03", "--prefill-per-token", "0.001")
    # 3000 tokens x 30 ms: the request is still running after the six tokens the test times.
    payload = {"prompt": words(200), "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client:
        client.get(sim.url + "/health")  # connection set up outside the measurement
        started = time.monotonic()
        arrivals = []
        with client.stream("POST", sim.url + "/v1/completions", json=payload) as response:
            lines = response.iter_lines()  # keep a reference: dropping it closes the stream
            for line in lines:
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic() - started)
                    if len(arrivals) == 6:
                        break
            # Six tokens reached the client while the request still runs: each was written
            # as its step produced it, not at the end.
            stats = sim.stats()
            assert stats["running"] == 1 and stats["completed_total"] == 0
    assert len(arrivals) == 6
    # Token k is due ttft + 200 uncached tokens x 1 ms + k decode steps after the request
    # was sent, never earlier (a slow machine only delays it).
    for k, at in enumerate(arrivals):
        assert at >= 0.05 + 0.2 + k * 0.03, k

    # Virtual time: one 200-token prefill step, then a lone 30 ms decode step per token,
    # however many steps ran before the client left (checked once the last step ended).
    def settled() -> dict[str, Any] | None:
        stats = sim.stats()
        expected = 0.2 + (stats["steps_total"] - 1) * 0.03
        return stats if stats["running"] == 0 and stats["busy_seconds_total"] == pytest.approx(
            expected, abs=1e-5) else None

    stats = wait_until(settled, what="busy time = one prefill step + 30 ms per decode step")
    assert stats["steps_total"] >= 6 and stats["prefill_tokens_total"] == 200
    assert stats["aborted_total"] == 1


def test_max_num_batched_tokens_chunks_a_long_prefill(spawn) -> None:
    sim = spawn("--ttft", "0", "--itl", "0", "--max-num-batched-tokens", "64",
                "--max-num-seqs", "8", "--max-model-len", "512")
    httpx.post(sim.url + "/v1/completions", json={"prompt": words(300), "max_tokens": 1})
    assert sim.stats()["steps_total"] == 5  # 64 + 64 + 64 + 64 + 44


def test_bad_cache_flags_fail_at_start(spawn) -> None:
    small = spawn("--num-gpu-blocks", "10", "--max-model-len", "4096", wait=False)
    assert small.wait(timeout=20) == 2
    assert "cannot hold one request" in small.log_text()
    bad_json = spawn("--kv-events-config", '{"enable_kv_cache_events": true, "nope": 1}',
                     wait=False)
    assert bad_json.wait(timeout=20) == 2
    assert "unknown field" in bad_json.log_text()


def test_prefix_caching_can_be_switched_off(spawn) -> None:
    sim = spawn("--ttft", "0", "--itl", "0", "--no-enable-prefix-caching")
    prompt = words(64)
    for _ in range(2):
        httpx.post(sim.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    stats = sim.stats()
    assert stats["prefix_hits_tokens"] == 0 and stats["cached_blocks"] == 0
    assert stats["prefill_tokens_total"] == 2 * 64  # nothing reused: both computed in full
    assert sim.metric("vllm:cache_config_info", enable_prefix_caching="False") == 1
    assert block_hashes(prompt_token_ids_for_completion(prompt))  # (the prompt has blocks)
