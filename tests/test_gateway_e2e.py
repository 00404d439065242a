"""The gateway end to end: real Ray Serve, the OpenAI SDK as client, simulators as processes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import uuid

import httpx
import openai
import pytest

from tests.conftest import FAST_HEALTH
from tests.support import finish_startup, wait_until

pytestmark = pytest.mark.timeout(180)

MODEL = "sim-model"
CHAT = [{"role": "user", "content": "Say something deterministic."}]


def test_openai_sdk_sync_async_stream_and_not(simulators, gateway) -> None:
    sims = simulators(2)
    gw = gateway([s.url for s in sims])
    gw.wait_states({s.url: "READY" for s in sims})
    direct = openai.OpenAI(base_url=sims[0].url + "/v1", api_key="x", max_retries=0)
    expected = direct.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8).choices[0].message.content
    expected_text = direct.completions.create(model=MODEL, prompt="abc", max_tokens=5).choices[0].text
    sdk = gw.sdk()

    assert [m.id for m in sdk.models.list().data] == [MODEL]
    chat = sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
    assert chat.choices[0].message.content == expected and chat.usage.completion_tokens == 8
    assert sdk.completions.create(model=MODEL, prompt="abc", max_tokens=5).choices[0].text == expected_text
    assert len(sdk.embeddings.create(model=MODEL, input=["a", "b"]).data) == 2

    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

    async def run_async() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        plain = await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
        stream = await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await aclient.close()
        return plain.choices[0].message.content, text

    assert asyncio.run(run_async()) == (expected, expected)


def test_kill_replicas_one_by_one_then_all_then_recover(simulators, gateway) -> None:
    sims = simulators(3)
    gw = gateway([s.url for s in sims], router="round_robin")
    gw.wait_states({s.url: "READY" for s in sims})
    assert set(gw.served_by(30)) == {s.url for s in sims}  # spread across all three

    sims[0].kill()  # SIGKILL: no goodbye
    seen = gw.served_by(30)
    assert sims[0].url not in seen and set(seen) == {sims[1].url, sims[2].url}

    sims[1].kill()
    assert set(gw.served_by(20)) == {sims[2].url}

    sims[2].kill()
    sdk = gw.sdk()
    for _ in range(10):
        with pytest.raises(openai.APIStatusError) as info:
            sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        assert info.value.status_code == 503
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "no_ready_replica"

    sims[1].restart()  # same port, no gateway restart
    sims[1].wait_ready(timeout=30)
    wait_until(lambda: gw.states()[sims[1].url] == "READY", 20, "the restarted replica to be READY")
    assert set(gw.served_by(10)) == {sims[1].url}


def test_starting_replica_gets_no_requests_until_it_answers(simulators, gateway) -> None:
    (ready,) = simulators(1)
    # Far longer than the test: the replica refuses connections (PENDING) until the test
    # itself lets it finish starting, however long the deploy takes.
    (starting,) = simulators(1, "--startup-delay", "600", wait=False)
    gw = gateway([ready.url, starting.url])
    gw.wait_states({ready.url: "READY", starting.url: "PENDING"})
    sdk = gw.sdk()
    for _ in range(10):  # round robin would alternate if the starting replica were a candidate
        raw = sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=CHAT, max_tokens=4, extra_headers={"x-gateway-router": "round_robin"}
        )
        # Served by the ready replica at the first attempt: the starting one was never tried.
        assert (raw.headers["x-gateway-replica"], raw.headers["x-gateway-attempts"]) == (ready.url, "1")
    assert gw.states()[starting.url] == "PENDING"  # it was starting the whole time
    finish_startup(starting)
    gw.wait_states({starting.url: "READY"})
    assert starting.url in gw.served_by(20, extra_headers={"x-gateway-router": "round_robin"})


def test_error_contract(simulators, gateway) -> None:
    sims = simulators(1)
    gw = gateway([sims[0].url], max_body_bytes=4096)
    gw.wait_states({sims[0].url: "READY"})
    sdk = gw.sdk()
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="no-such-model", messages=CHAT)
    assert info.value.body["code"] == "model_not_found"

    def post(body: bytes | str, path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
        return httpx.post(gw.url + path, content=body, headers={"content-type": "application/json", **headers}, timeout=10)

    cases = [
        (post(b"{not json"), 400),
        (post(json.dumps({"messages": CHAT})), 400),
        (post(json.dumps({"model": MODEL, "messages": CHAT, "stream": "yes"})), 400),
        (post(json.dumps({"model": MODEL, "messages": CHAT}), **{"x-gateway-router": "nope"}), 400),
        (post(json.dumps({"model": MODEL, "prompt": "x" * 5000}), "/v1/completions"), 413),
        (httpx.get(gw.url + "/v1/nothing-here", timeout=10), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    # vLLM's own 400 (prompt longer than max_model_len) passes through unchanged.
    response = post(json.dumps({"model": MODEL, "prompt": "word " * 600, "max_tokens": 5000}), "/v1/completions")
    assert response.status_code == 400 and response.json()["error"]["code"] == 400


def test_stream_passes_through_byte_for_byte(simulators, gateway) -> None:
    sims = simulators(2)
    gw = gateway([s.url for s in sims])
    gw.wait_states({s.url: "READY" for s in sims})
    for path, payload in [
        ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 12, "stream": True,
                                  "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"model": MODEL, "prompt": "one two", "max_tokens": 12, "stream": True}),
    ]:
        request_id = uuid.uuid4().hex
        with httpx.stream("POST", gw.url + path, json=payload, headers={"x-request-id": request_id}, timeout=30) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-request-id"] == request_id
            received = b"".join(resp.iter_raw())
            replica = resp.headers["x-gateway-replica"]
        sent = httpx.get(f"{replica}/sim/record/{request_id}", timeout=5)
        assert sent.status_code == 200
        assert received == sent.content
        assert received.endswith(b"data: [DONE]\n\n")


def test_client_disconnect_cancels_upstream(simulators, gateway) -> None:
    (sim,) = simulators(1, "--itl", "0.1")
    gw = gateway([sim.url])
    gw.wait_states({sim.url: "READY"})
    payload = {"model": MODEL, "messages": CHAT, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=payload, timeout=30) as resp:
        stream = resp.iter_raw()
        assert next(stream).startswith(b"data: ")
        wait_until(lambda: httpx.get(sim.url + "/sim/stats").json()["running"] == 1, 10, "the stream to run")
    stats = wait_until(
        lambda: (s := httpx.get(sim.url + "/sim/stats").json())["running"] == 0 and s,
        15,
        "the replica to free the slot after the client left",
    )
    assert stats["aborted_total"] == 1 and stats["completed_total"] == 0


def test_metrics_are_fleet_wide_with_two_ingress_replicas(simulators, gateway) -> None:
    sims = simulators(2)
    gw = gateway([s.url for s in sims], ingress_replicas=2)
    gw.wait_states({s.url: "READY" for s in sims})
    ingress_ids = wait_until(
        lambda: len(ids := {gw.table()["ingress_replica"] for _ in range(10)}) == 2 and ids,
        20,
        "both ingress replicas to answer",
    )
    assert len(ingress_ids) == 2
    served = gw.served_by(40)
    with pytest.raises(openai.NotFoundError):
        gw.sdk().chat.completions.create(model="unknown", messages=CHAT)

    def totals() -> dict[str, float]:
        text = httpx.get(gw.url + "/metrics", timeout=10).text
        out: dict[str, float] = collections.defaultdict(float)
        for name, labels, value in re.findall(r"^(gateway_\w+)\{([^}]*)\} (\S+)$", text, re.M):
            out[f"{name}{{{labels}}}"] += float(value)
        return out

    expected = {
        **{f'gateway_requests_total{{model="{MODEL}",replica="{replica}",status="200"}}': float(count)
           for replica, count in served.items()},
        # Recorded by whichever ingress replica answered the 404: it may reach the
        # aggregate a push later than the 200s, so the wait covers it too.
        'gateway_requests_total{model="(unknown)",replica="",status="404"}': 1.0,
        'gateway_replicas{state="READY"}': 2.0,
        f'gateway_request_duration_seconds_count{{model="{MODEL}"}}': 40.0,
    }
    last: dict[str, float] = {}

    def adds_up() -> bool:
        nonlocal last
        figures = totals()
        last = {key: figures.get(key, 0.0) for key in expected}
        return last == expected

    with contextlib.suppress(AssertionError):  # on time-out, the assert below shows the difference
        wait_until(adds_up, 15, "fleet-wide metrics to add up")
    assert last == expected


def test_replica_dying_mid_stream_ends_with_error_event(simulators, gateway) -> None:
    (sim,) = simulators(1, "--die-mid-stream-after", "3")
    gw = gateway([sim.url])
    gw.wait_states({sim.url: "READY"})
    payload = {"model": MODEL, "messages": CHAT, "max_tokens": 20, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=payload, timeout=30) as resp:
        assert resp.status_code == 200
        body = b"".join(resp.iter_raw())
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "upstream_reset" and error["message"]
    assert sum('"delta"' in e for e in events[:-2]) >= 1  # the tokens sent before the failure arrived
    with pytest.raises(openai.APIError):  # the SDK surfaces the error event as an exception
        for _ in gw.sdk().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, stream=True):
            pass


def test_hanging_replica_is_ejected_and_request_served_elsewhere(simulators, gateway) -> None:
    hung, healthy = simulators(2)
    gw = gateway(
        [hung.url, healthy.url],
        router="round_robin",
        timeouts={"first_byte_s": 1.0},
        health={**FAST_HEALTH, "ejection_base_s": 60},  # stays out for the whole test
    )
    gw.wait_states({hung.url: "READY", healthy.url: "READY"})
    hung.set_faults(hang=True)  # accepts, never answers /v1/*; its /health stays green
    seen = gw.served_by(6)
    assert set(seen) == {healthy.url}
    # The ingress replica reports the timeout to the health actor, which ejects it for everyone
    # and publishes that in a later snapshot: wait for it (ejection_base_s=60 keeps it there).
    gw.wait_states({hung.url: "EJECTED"})
