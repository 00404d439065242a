"""Limits on a request are the request's problem, not the replica's (issue 9, item 4).

A healthy replica that takes longer than `timeouts.first_byte_s` to answer a non-streamed
request, or a stream that reaches `timeouts.total_s`, must not be ejected or retried
elsewhere. A replica that does not answer at all is still a failure: see
`test_hanging_replica_is_ejected_and_request_served_elsewhere` in test_gateway_e2e.py,
and the streaming variant below.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import FAST_HEALTH

pytestmark = pytest.mark.timeout(180)

MODEL = "sim-model"
CHAT = [{"role": "user", "content": "Say something deterministic."}]
# The replica stays out for the whole test once ejected, locally or by the health actor:
# a follow-up request to the only replica then gets a 503, which is how these tests see it.
STAY_OUT = {**FAST_HEALTH, "ejection_base_s": 120, "ejection_max_s": 120}


def chat(gw, max_tokens: int, stream: bool = False, timeout: float = 60) -> httpx.Response:
    payload = {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens, "stream": stream,
               "ignore_eos": True}
    return httpx.post(gw.url + "/v1/chat/completions", json=payload, timeout=timeout)


def sse_events(body: bytes) -> list[str]:
    return [part[6:] for part in body.decode().split("\n\n") if part.startswith("data: ")]


def test_a_slow_non_streamed_answer_is_not_a_replica_failure(simulators, gateway) -> None:
    # 20 tokens at 0.1 s each: about 2 s, four times the first-byte limit. vLLM sends a
    # non-streamed answer's headers only with its body, so nothing arrives before the end.
    (sim,) = simulators(1, "--itl", "0.1")
    gw = gateway([sim.url], timeouts={"first_byte_s": 0.5}, health=STAY_OUT)
    gw.wait_states({sim.url: "READY"})
    resp = chat(gw, 20)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-gateway-attempts"] == "1"  # not retried elsewhere either
    assert resp.json()["usage"]["completion_tokens"] == 20
    # Not ejected (locally it would be at once, and this is the only replica).
    quick = chat(gw, 1)
    assert quick.status_code == 200, quick.text
    assert gw.states() == {sim.url: "READY"}
    assert sim.stats()["completed_total"] == 2  # each request ran once, nothing was abandoned


def test_a_stream_reaching_total_s_ends_cleanly_and_does_not_eject(simulators, gateway) -> None:
    (sim,) = simulators(1, "--itl", "0.1")
    gw = gateway([sim.url], timeouts={"total_s": 1.5}, health=STAY_OUT)
    gw.wait_states({sim.url: "READY"})
    resp = chat(gw, 200, stream=True)  # 20 s of tokens: far past the request's limit
    assert resp.status_code == 200
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "request_time_limit" and "1.5s" in error["message"]
    assert sum('"delta"' in e for e in events[:-2]) >= 2  # tokens flowed until the limit
    quick = chat(gw, 1)
    assert quick.status_code == 200, quick.text  # the replica was not ejected for it
    assert gw.states() == {sim.url: "READY"}


def test_a_non_streamed_answer_past_total_s_is_a_504_of_the_request(simulators, gateway) -> None:
    sims = simulators(2, "--itl", "0.1")
    gw = gateway([s.url for s in sims], router="round_robin",
                 timeouts={"first_byte_s": 0.3, "total_s": 1.0}, health=STAY_OUT)
    gw.wait_states({s.url: "READY" for s in sims})
    resp = chat(gw, 100)
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "request_time_limit"
    assert resp.headers["x-gateway-attempts"] == "1"  # another replica would not be faster
    assert all(chat(gw, 1).status_code == 200 for _ in range(4))
    assert gw.states() == {s.url: "READY" for s in sims}


def test_a_hung_replica_is_still_a_failure_for_streams(simulators, gateway) -> None:
    hung, healthy = simulators(2)
    gw = gateway([hung.url, healthy.url], router="round_robin", timeouts={"first_byte_s": 0.5}, health=STAY_OUT)
    gw.wait_states({hung.url: "READY", healthy.url: "READY"})
    hung.set_faults(hang=True)  # accepts, never answers /v1/* (a liveness check of it hangs too)
    for _ in range(4):
        resp = chat(gw, 4, stream=True)
        assert resp.status_code == 200 and resp.headers["x-gateway-replica"] == healthy.url
        assert sse_events(resp.content)[-1] == "[DONE]"
    gw.wait_states({hung.url: "EJECTED"})
