"""Whose fault is a 5xx: the replica's (eject it) or the request's (never eject for it)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import FAST_HEALTH
from tests.support import wait_until

MODEL = "sim-model"
POISON = "poison-pill-7d1c"


def chat(gw, content: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2})


def test_a_request_every_replica_fails_does_not_eject_the_fleet(simulators, gateway) -> None:
    sims = simulators(2)
    for sim in sims:
        sim.set_faults(error_status_for_prompts_containing=POISON)  # a request that breaks any engine
    gw = gateway([s.url for s in sims], health={**FAST_HEALTH, "eject_after_failures": 2})
    gw.wait_states({s.url: "READY" for s in sims})
    for i in range(6):
        resp = chat(gw, f"{POISON} number {i}")
        assert resp.status_code == 500  # the replicas' answer, passed through
        assert resp.headers["x-gateway-attempts"] == "2"  # tried on both
    # Nobody was ejected for it, and ordinary requests are still served by both.
    assert gw.states() == {s.url: "READY" for s in sims}
    with pytest.raises(openai.InternalServerError):
        gw.sdk().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": POISON}])
    assert all(chat(gw, f"fine {i}").status_code == 200 for i in range(4))
    assert gw.states() == {s.url: "READY" for s in sims}


def test_a_replica_that_fails_what_others_serve_is_ejected(simulators, gateway) -> None:
    bad, good = simulators(2)
    gw = gateway([bad.url, good.url], router="round_robin", health={**FAST_HEALTH, "eject_after_failures": 2,
                                                                     "ejection_base_s": 60})
    gw.wait_states({bad.url: "READY", good.url: "READY"})
    bad.set_faults(error_status=500)  # (after its models are known: /v1/models answers 500 too)
    for i in range(6):
        resp = chat(gw, f"question {i}")
        assert resp.status_code == 200 and resp.headers["x-gateway-replica"] == good.url
    gw.wait_states({bad.url: "EJECTED"})
