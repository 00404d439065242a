"""Hold-and-wait: a request for a model whose replicas are all starting waits for one."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.support import finish_startup, wait_until

pytestmark = pytest.mark.timeout(180)

MODEL = "sim-model"
CHAT = [{"role": "user", "content": "hold me"}]


def test_request_waits_for_a_starting_replica(simulators, gateway) -> None:
    # Far longer than the test: the replica stays PENDING (refusing connections) until
    # the test itself lets it finish starting, however long the deploy takes.
    (starting,) = simulators(1, "--startup-delay", "600", wait=False)
    gw = gateway([starting.url], models={starting.url: [MODEL]}, hold={"timeout_s": 60})
    gw.wait_states({starting.url: "PENDING"})
    in_flight = f'gateway_requests_in_flight{{model="{MODEL}"}}'
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(gw.sdk().chat.completions.with_raw_response.create, model=MODEL, messages=CHAT, max_tokens=4)
        # The gateway has the request and no READY replica to send it to.
        wait_until(lambda: held.done() or gw.metrics().get(in_flight) == 1, 30, "the request to reach the gateway")
        assert not held.done(), f"answered while no replica was up: {held.exception() or held.result()}"
        assert gw.states()[starting.url] == "PENDING"
        finish_startup(starting)  # the "model" has loaded: the held request may go now
        raw = held.result(timeout=60)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-gateway-replica"] == starting.url
    assert starting.stats()["completed_total"] == 1  # served by the process that came up


def test_hold_times_out_with_503_and_short_retry_after(simulators, gateway) -> None:
    (starting,) = simulators(1, "--startup-delay", "600", wait=False)
    gw = gateway([starting.url], models={starting.url: [MODEL]}, hold={"timeout_s": 1.5, "retry_after_starting_s": 1})
    gw.wait_states({starting.url: "PENDING"})
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        gw.sdk().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    waited = time.monotonic() - began
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "1"
    assert "still starting" in info.value.message
    assert 1.4 <= waited < 15


def test_full_hold_queue_answers_503_at_once(simulators, gateway) -> None:
    (starting,) = simulators(1, "--startup-delay", "600", wait=False)
    gw = gateway([starting.url], models={starting.url: [MODEL]}, hold={"timeout_s": 30, "max_waiting": 0})
    gw.wait_states({starting.url: "PENDING"})
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        gw.sdk().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert info.value.status_code == 503 and "too many requests" in info.value.message
    assert time.monotonic() - began < 10


def test_nothing_coming_means_503_with_configured_retry_after(simulators, gateway) -> None:
    (sim,) = simulators(1)
    gw = gateway([sim.url], retry_after_s=7, hold={"timeout_s": 30})
    gw.wait_states({sim.url: "READY"})
    sim.kill()
    statuses = set()
    for _ in range(5):
        with pytest.raises(openai.APIStatusError) as info:
            gw.sdk().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        statuses.add((info.value.status_code, info.value.response.headers.get("retry-after")))
    assert statuses == {(503, "7")}
