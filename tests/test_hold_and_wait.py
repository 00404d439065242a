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


def test_a_cold_start_burst_leaves_slots_for_other_models_and_metrics(simulators, gateway) -> None:
    """Every held request occupies one of the ingress replica's Serve slots. With 8 slots, a
    burst of 8 requests for a model that is starting must not take them all: past the bounds
    (by default half the slots in all, half of that per model) the burst gets 503 at once, and
    a model that is up, another model that is starting, and /metrics are still served."""
    (cold,) = simulators(1, "--startup-delay", "600", wait=False, model="cold")
    (cold2,) = simulators(1, "--startup-delay", "600", wait=False, model="cold2")
    (warm,) = simulators(1, model="warm")
    gw = gateway(
        [cold.url, cold2.url, warm.url],
        models={cold.url: ["cold"], cold2.url: ["cold2"], warm.url: ["warm"]},
        max_ongoing_requests=8,
        hold={"timeout_s": 120, "retry_after_starting_s": 1},
    )
    gw.wait_states({cold.url: "PENDING", cold2.url: "PENDING", warm.url: "READY"})
    sdk = gw.sdk(timeout=170)

    def ask(model: str) -> object:
        try:
            return sdk.chat.completions.with_raw_response.create(model=model, messages=CHAT, max_tokens=4)
        except openai.APIStatusError as err:
            return err

    def in_flight(model: str) -> float:
        return gw.metrics().get(f'gateway_requests_in_flight{{model="{model}"}}', 0.0)

    with ThreadPoolExecutor(9) as pool:
        burst = [pool.submit(ask, "cold") for _ in range(8)]
        # Each request of the burst is answered or waiting in the gateway, and /metrics answers.
        wait_until(lambda: in_flight("cold") + sum(f.done() for f in burst) == 8, 60,
                   "every request of the burst to be held or answered, /metrics answering")
        held = [f for f in burst if not f.done()]
        refused = [f.result() for f in burst if f.done()]
        assert len(held) == 2, f"{len(held)} held for one model; the per-model bound is 2"
        for err in refused:
            assert isinstance(err, openai.APIStatusError), err
            assert err.status_code == 503 and err.response.headers["retry-after"] == "1"
            assert "too many requests" in err.message and "cold" in err.message
        # Another model that is starting still gets a hold, and a model that is up is served.
        other = pool.submit(ask, "cold2")
        wait_until(lambda: in_flight("cold2") == 1, 30, "the request for the other starting model to be held")
        assert not other.done(), other.result()
        assert sum(gw.served_by(3, model="warm").values()) == 3
        finish_startup(cold)
        finish_startup(cold2)
        for future in [*held, other]:
            raw = future.result(timeout=60)
            assert not isinstance(raw, Exception), raw
            assert raw.http_response.status_code == 200
