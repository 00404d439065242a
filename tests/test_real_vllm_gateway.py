"""The gateway (real Ray Serve) in front of two real vLLM servers, driven with the OpenAI SDK.

Static discovery with no model list: the models are learned from real vLLM's
`/v1/models`, readiness from its `/health`, load from its `/metrics`. The last test
stops both servers (SIGKILL one, SIGTERM the other); the shared fleet starts them
again for whatever runs after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import httpx
import openai
import pytest

from tests import real_vllm
from tests.conftest import FAST_HEALTH
from tests.support import wait_until

pytestmark = pytest.mark.timeout(1500)

MODEL = real_vllm.MODEL
CHAT = [{"role": "user", "content": "hello world tell me a story"}]
EXACT = {"extra_body": {"ignore_eos": True, "temperature": 0.0}}  # exactly max_tokens tokens


@pytest.fixture(scope="session")
def vllm_fleet(request: pytest.FixtureRequest) -> real_vllm.Fleet:
    return real_vllm.fleet(request)


@pytest.fixture
def pair(vllm_fleet: real_vllm.Fleet) -> list[real_vllm.VLLMServer]:
    return vllm_fleet.servers(2)


def deploy(gateway, servers: list[real_vllm.VLLMServer], **overrides):
    gw = gateway([s.url for s in servers], **overrides)  # no models given: read from /v1/models
    gw.wait_states({s.url: "READY" for s in servers}, timeout=60)
    return gw


def test_openai_sdk_through_the_gateway(pair, gateway) -> None:
    gw = deploy(gateway, pair, router="round_robin")
    sdk = gw.sdk(timeout=120)
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    table = gw.table()
    assert {r["replica_id"]: r["models"] for r in table["replicas"]} == {s.url: [MODEL] for s in pair}

    served = set()
    for _ in range(4):  # round robin: both servers answer
        raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT, max_tokens=6, **EXACT)
        reply = raw.parse()
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
        assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.content
        served.add(raw.headers["x-gateway-replica"])
    assert served == {s.url for s in pair}

    text = sdk.completions.create(model=MODEL, prompt="hello world", max_tokens=5, **EXACT)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5 and text.choices[0].text

    chunks = list(sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=7, stream=True,
                                              stream_options={"include_usage": True}, **EXACT))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7

    pieces = list(sdk.completions.create(model=MODEL, prompt="hello world", max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}, **EXACT))
    assert [p.choices[0].finish_reason for p in pieces if p.choices][-1] == "length"
    assert pieces[-1].usage.completion_tokens == 4  # vLLM may put several tokens in one chunk

    async def run_async() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        plain = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, **EXACT)
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=True, **EXACT)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return plain.choices[0].message.content, streamed

    plain, streamed = asyncio.run(run_async())
    assert plain and streamed

    # Real vLLM's errors pass through in OpenAI's format; the gateway's own 404 for an unknown model.
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model=MODEL, prompt="hello", max_tokens=5000)  # over the 2048 context
    assert info.value.status_code == 400 and "2048" in info.value.message  # vLLM names its context length
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"


def test_load_scrape_reads_real_vllm_metrics(pair, gateway) -> None:
    """The health actor's scrape of real /metrics: cache size from cache_config_info, running requests."""
    gw = deploy(gateway, pair)

    def loads() -> dict[str, dict]:
        return {r["replica_id"]: r["load"] for r in gw.table()["replicas"] if r["load"]}

    wait_until(lambda: len(loads()) == 2, 30, "a load sample from both servers")
    for load in loads().values():
        assert load["cache_tokens"] == 2048 * real_vllm.BLOCK_SIZE  # num_gpu_blocks x block_size, as vLLM reports
        assert load["running"] == 0 and load["waiting"] == 0

    # A long stream is running on one server: its scraped `running` shows it (the gateway's
    # in-flight count is added on top of a sample, so the sample itself is checked).
    target = pair[0]
    direct = openai.OpenAI(base_url=target.url + "/v1", api_key="x", max_retries=0, timeout=300)
    started, release = threading.Event(), threading.Event()

    def long_stream() -> int:
        stream = direct.completions.create(model=MODEL, prompt="hello", max_tokens=2000 - 8, stream=True, **EXACT)
        count = 0
        for _ in stream:
            count += 1
            started.set()
            if release.is_set():
                break
        stream.close()
        return count

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        worker = pool.submit(long_stream)
        try:
            wait_until(lambda: started.is_set() or worker.done(), 120, "the long stream's first token")
            assert not worker.done(), worker.result()
            wait_until(lambda: (loads().get(target.url) or {}).get("running") == 1, 30,
                       "the scraped sample to show the running request")
        finally:
            release.set()
        worker.result(timeout=120)
    wait_until(lambda: (loads().get(target.url) or {}).get("running") == 0, 30, "running back to 0 (request aborted)")


def test_sigkill_retried_elsewhere_sigterm_drains_then_503(pair, gateway) -> None:
    """One server SIGKILLed: retried on the other. The other SIGTERMed mid-stream: its stream
    finishes (--shutdown-timeout) and it exits 0; when none is left: 503. What new requests
    get while the last one drains is checked at the end (a known gap: xfail)."""
    killed, drained = pair
    # Probes and scrapes far apart: the gateway learns of the crash from the refused connection.
    slow = {**FAST_HEALTH, "probe_interval_s": 60, "metrics_interval_s": 60}
    gw = deploy(gateway, pair, router="round_robin", health=slow)
    sdk = gw.sdk(timeout=120)
    assert len(gw.served_by(2, model=MODEL)) == 2

    killed.kill()  # the API server, engine core and worker, at once
    attempts = []
    for _ in range(4):
        raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT, max_tokens=2, **EXACT)
        assert raw.http_response.status_code == 200
        assert raw.headers["x-gateway-replica"] == drained.url
        attempts.append(int(raw.headers["x-gateway-attempts"]))
    assert 2 in attempts, attempts  # round robin sent one to the dead server first: retried on the other
    gw.wait_states({killed.url: "EJECTED"}, timeout=10)

    # SIGTERM with a stream in flight: vLLM drains for up to --shutdown-timeout.
    stream = sdk.completions.create(model=MODEL, prompt="hello", max_tokens=300, stream=True,
                                    stream_options={"include_usage": True}, **EXACT)
    first = next(iter(stream))
    drained.proc.send_signal(15)  # SIGTERM to the API server's PID only, as Kubernetes does
    # New requests while it drains (it is the last server): a clean answer or a retryable 503.
    during: list[tuple[int, str]] = []
    while drained.proc.poll() is None and len(during) < 20:
        answer = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": CHAT, "max_tokens": 2})
        during.append((answer.status_code, answer.text[:200]))
        if answer.status_code != 200:
            break
    rest = list(stream)
    assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1] == "length"
    assert rest[-1].usage.completion_tokens == 300  # finished, not cut
    assert drained.proc.wait(60) == 0, drained.log_tail()

    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as info:
            sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "no_ready_replica"
        assert int(info.value.response.headers["retry-after"]) >= 1
    assert httpx.get(gw.url + "/v1/models", timeout=10).json()["data"] == []  # nothing READY serves it

    # Last, so that everything above is checked either way: vLLM 0.32 keeps /health at 200
    # while it drains and answers every new request 500 "cannot schedule new futures after
    # shutdown"; with no other replica left the gateway passes that 500 on (its contract
    # says a retryable 503). Known gap in the gateway: xfail until it maps this to 503.
    statuses = {status for status, _ in during}
    assert statuses <= {200, 500, 503}, during
    if 500 in statuses:
        assert any("after shutdown" in text for status, text in during if status == 500), during
        pytest.xfail("draining vLLM answers 500 'cannot schedule new futures after shutdown'; "
                     f"the gateway passed it on instead of a 503: {during[-1]}")
