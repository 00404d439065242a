"""The simulator's fixes for drifts found by tests/test_real_vllm_differential.py.

These run without real vLLM (simulator only), so the fixes stay guarded on a machine
without the real-vLLM venv too; the differential test is what found them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from serve_app.control.load_metrics import parse_load
from tests.support import wait_until
from vllm_sim.testing import SimulatorProcess, metric_value

pytestmark = pytest.mark.timeout(120)

MODEL = "tiny-model"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    proc = SimulatorProcess(["--model", MODEL, "--ttft", "0", "--itl", "0.01", "--max-num-seqs", "1"])
    proc.start().wait_ready(timeout=30)
    yield proc
    proc.stop()
    proc.close()


def test_chat_message_has_vllm_0_32_keys(sim: SimulatorProcess) -> None:
    """vLLM drops an empty `tool_calls` list and calls its field `reasoning` (not `reasoning_content`)."""
    body = httpx.post(sim.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}).json()
    message = body["choices"][0]["message"]
    assert set(message) == {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}


def test_waiting_by_reason_is_exported_and_counted_once(sim: SimulatorProcess) -> None:
    """`vllm:num_requests_waiting_by_reason` splits the same queue: the load scrape must not add it."""
    hold = {"model": MODEL, "prompt": "hold the slot", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    queued_result: list[int] = []
    with httpx.Client(timeout=60) as holder:
        with holder.stream("POST", sim.url + "/v1/completions", json=hold) as stream:
            chunks = stream.iter_bytes()
            assert next(chunks).startswith(b"data: ")  # it holds the only running slot

            def queued_request() -> None:
                queued_result.append(httpx.post(sim.url + "/v1/completions", timeout=60, json={
                    "model": MODEL, "prompt": "wait for me", "max_tokens": 2}).status_code)

            waiter = threading.Thread(target=queued_request, daemon=True)
            waiter.start()
            def one_waiting() -> str | None:
                text = httpx.get(sim.url + "/metrics").text
                return text if metric_value(text, "vllm:num_requests_waiting") == 1 else None

            text = wait_until(one_waiting, 30, "one request queued behind the held slot")
            assert metric_value(text, "vllm:num_requests_waiting_by_reason", reason="capacity") == 1
            assert metric_value(text, "vllm:num_requests_waiting_by_reason", reason="deferred") == 0
            load = parse_load(text)
            assert (load.running, load.waiting) == (1, 1)
        waiter.join(60)
    assert queued_result == [200]
