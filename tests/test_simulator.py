"""Tests of the vLLM simulator, run as real subprocesses on loopback ports.

Happy paths use the OpenAI SDK as the client; wire-level checks use httpx or sockets.
Synchronisation is by polling with deadlines, never by fixed sleeps. A state the test
looks at (loading, a full engine, a drain) lasts until the test itself ends it, not for
a fixed time; claims about speed are checked on the simulator's own counters, and
wall-clock figures only as lower bounds that a slow machine cannot break.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.support import finish_startup
from vllm_sim.generation import embed, generate, natural_length, render_chat, tokenize
from vllm_sim.testing import LOADING_PREFIX, READY_PREFIX, SimulatorProcess, metric_value

pytestmark = pytest.mark.timeout(60)

MODEL = "sim-model"
OTHER = "other-model"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours, please."},
]
STREAM_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)


# ----- fixtures and helpers ----------------------------------------------------------


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(
        ["--model", MODEL, "--model", OTHER, "--ttft", "0.005", "--itl", "0.001",
         "--max-model-len", "512", "--max-num-seqs", "16"]
    )
    with sim:
        sim.start().wait_ready()
        yield sim


@pytest.fixture
def sim(shared_sim: SimulatorProcess) -> Iterator[SimulatorProcess]:
    """The shared simulator, with no fault knobs set before or after the test."""
    assert shared_sim.is_running(), shared_sim.log_tail()
    shared_sim.reset_faults()
    yield shared_sim
    if shared_sim.is_running():
        shared_sim.reset_faults()


@pytest.fixture
def spawn() -> Iterator[Callable[..., SimulatorProcess]]:
    """Start a dedicated simulator; every one is stopped by PID at teardown."""
    started: list[SimulatorProcess] = []

    def _spawn(*args: str, wait: bool = True) -> SimulatorProcess:
        sim = SimulatorProcess(list(args))
        started.append(sim)
        sim.start()
        if wait:
            sim.wait_ready()
        return sim

    yield _spawn
    for sim in started:
        sim.close()


def sdk(sim: SimulatorProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.openai_base_url, api_key="x", max_retries=0, timeout=20)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order; every event must be well formed."""
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: "), block
        events.append(block[len(b"data: "):].decode())
    return events


def read_stream(response: httpx.Response) -> tuple[bytes, Exception | None]:
    """All body bytes of a streamed response, and the error that cut it short (if any)."""
    parts: list[bytes] = []
    try:
        for part in response.iter_bytes():
            parts.append(part)
    except STREAM_ERRORS as exc:
        return b"".join(parts), exc
    return b"".join(parts), None


def raw_post(sim: SimulatorProcess, path: str, payload: dict[str, Any]) -> tuple[bytes, OSError | None]:
    """POST over a bare socket; returns every byte received and the socket error, if any."""
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {sim.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    received = b""
    with socket.create_connection((sim.host, sim.port), timeout=10) as sock:
        sock.sendall(head + body)
        try:
            while data := sock.recv(65536):
                received += data
        except OSError as exc:
            return received, exc
    return received, None


def chat_payload(max_tokens: int, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": stream, **extra}


def expected_chat(max_tokens: int, model: str = MODEL):
    return generate(model, render_chat(MESSAGES), max_tokens)


# ----- models, health, version -------------------------------------------------------


def test_models_list_shape(sim: SimulatorProcess) -> None:
    ids = [m.id for m in sdk(sim).models.list()]
    assert ids == [MODEL, OTHER]

    body = httpx.get(sim.url + "/v1/models").json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert set(card) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len",
                         "permission"}
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["root"] == MODEL and card["parent"] is None
    assert card["max_model_len"] == 512 and isinstance(card["created"], int)


def test_health_version_and_unknown_route(sim: SimulatorProcess) -> None:
    health = httpx.get(sim.url + "/health")
    assert health.status_code == 200 and health.content == b""
    assert httpx.get(sim.url + "/version").json() == {"version": "0.11.0-sim"}
    missing = httpx.get(sim.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    wrong_method = httpx.get(sim.url + "/v1/chat/completions")
    assert wrong_method.status_code == 405


# ----- generation --------------------------------------------------------------------


def test_chat_completion_is_deterministic(sim: SimulatorProcess) -> None:
    client = sdk(sim)
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7)
    second = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7)
    other = client.chat.completions.create(model=OTHER, messages=MESSAGES, max_tokens=7)

    expected = expected_chat(7)
    assert first.choices[0].message.content == expected.text
    assert second.choices[0].message.content == expected.text
    assert other.choices[0].message.content == expected_chat(7, OTHER).text != expected.text
    assert first.id.startswith("chatcmpl-") and first.object == "chat.completion"
    assert first.model == MODEL
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenize(render_chat(MESSAGES)))
    assert first.usage.prompt_tokens == prompt_tokens
    assert first.usage.completion_tokens == 7
    assert first.usage.total_tokens == prompt_tokens + 7


def test_chat_finishes_with_stop_before_max_tokens(sim: SimulatorProcess) -> None:
    natural = natural_length(MODEL, render_chat(MESSAGES))
    reply = sdk(sim).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=natural + 10
    )
    assert reply.choices[0].finish_reason == "stop"
    # As in vLLM, the EOS token counts as a completion token but adds no text.
    assert reply.usage.completion_tokens == natural + 1
    assert reply.choices[0].message.content == expected_chat(natural).text


def test_text_completion_and_default_max_tokens(sim: SimulatorProcess) -> None:
    client = sdk(sim)
    prompt = "The quick brown fox"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == generate(MODEL, prompt, 5).text
    assert reply.usage.prompt_tokens == 4 and reply.usage.completion_tokens == 5

    default = client.completions.create(model=MODEL, prompt=prompt)
    assert default.usage.completion_tokens == 16  # --max-tokens-default
    assert default.choices[0].text == generate(MODEL, prompt, 16).text


def test_embeddings_are_deterministic_unit_vectors(sim: SimulatorProcess) -> None:
    # The SDK asks for base64 by default and decodes float32 itself.
    result = sdk(sim).embeddings.create(model=MODEL, input=["hello world", "bye"])
    assert [d.index for d in result.data] == [0, 1]
    assert result.data[0].embedding == embed(MODEL, "hello world", 16)
    assert result.data[1].embedding == embed(MODEL, "bye", 16)
    assert abs(sum(v * v for v in result.data[0].embedding) - 1.0) < 1e-5
    assert result.usage.prompt_tokens == 3

    raw = httpx.post(sim.url + "/v1/embeddings",
                     json={"model": MODEL, "input": "hello world", "encoding_format": "float"})
    body = raw.json()
    assert body["object"] == "list" and body["id"].startswith("embd-")
    assert body["data"][0]["embedding"] == embed(MODEL, "hello world", 16)

    b64 = httpx.post(sim.url + "/v1/embeddings",
                     json={"model": MODEL, "input": "bye", "encoding_format": "base64"}).json()
    decoded = list(struct.unpack("<16f", base64.b64decode(b64["data"][0]["embedding"])))
    assert decoded == embed(MODEL, "bye", 16)


# ----- streaming ---------------------------------------------------------------------


def test_chat_stream_event_order_on_the_wire(sim: SimulatorProcess) -> None:
    payload = chat_payload(5, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", sim.url + "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        raw, error = read_stream(response)
    assert error is None
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]

    role, *content, usage_chunk = chunks
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["object"] == "chat.completion.chunk"
    assert len(content) == 5
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == expected_chat(5).text
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert len({c["id"] for c in chunks}) == 1


def test_sdk_streaming_with_include_usage(sim: SimulatorProcess) -> None:
    stream = sdk(sim).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_chat(6).text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_stream_without_usage(sim: SimulatorProcess) -> None:
    payload = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", sim.url + "/v1/completions", json=payload) as response:
        raw, error = read_stream(response)
    assert error is None
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 4  # no role chunk, no usage chunk
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == generate(
        MODEL, "Once upon a time", 4).text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_record_holds_exactly_the_bytes_sent(sim: SimulatorProcess) -> None:
    headers = {"x-request-id": "rec-stream-1"}
    payload = chat_payload(8, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", sim.url + "/v1/chat/completions", json=payload,
                      headers=headers) as response:
        assert response.headers["x-request-id"] == "rec-stream-1"
        raw, error = read_stream(response)
    assert error is None and raw.endswith(b"data: [DONE]\n\n")
    assert sim.record("rec-stream-1") == raw
    assert json.loads(sse_events(raw)[0])["id"] == "chatcmpl-rec-stream-1"

    unary = httpx.post(sim.url + "/v1/completions", headers={"x-request-id": "rec-unary-1"},
                       json={"model": MODEL, "prompt": "abc", "max_tokens": 3})
    assert sim.record("rec-unary-1") == unary.content
    assert sim.record("never-seen") is None


# ----- errors ------------------------------------------------------------------------


def test_unknown_model_is_404_with_vllm_error_body(sim: SimulatorProcess) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk(sim).chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.status_code == 404

    response = httpx.post(sim.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "The model `nope` does not exist.",
                                         "type": "NotFoundError", "param": None, "code": 404}}


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", b'{"model": "sim-model", "messages": ['),
        ("/v1/chat/completions", b'["not", "an", "object"]'),
        ("/v1/chat/completions", json.dumps({"model": MODEL}).encode()),
        ("/v1/chat/completions", json.dumps(chat_payload(5) | {"max_tokens": "5"}).encode()),
        ("/v1/chat/completions", json.dumps(chat_payload(5) | {"stream_options": {}}).encode()),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": 42}).encode()),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode()),
        ("/v1/completions", json.dumps({"model": 7, "prompt": "x"}).encode()),
        ("/v1/embeddings", json.dumps({"model": MODEL}).encode()),
    ],
    ids=["truncated-json", "not-object", "no-messages", "str-max-tokens", "stream-options",
         "int-prompt", "zero-max-tokens", "int-model", "no-input"],
)
def test_bad_requests_are_400(sim: SimulatorProcess, path: str, body: bytes) -> None:
    response = httpx.post(sim.url + path, content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] is None and error["message"]


def test_prompt_longer_than_context_is_400(sim: SimulatorProcess) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(600))  # --max-model-len 512
    with pytest.raises(openai.BadRequestError) as info:
        sdk(sim).completions.create(model=MODEL, prompt=long_prompt)
    assert "maximum context length is 512" in str(info.value)
    # Prompt fits, but prompt + max_tokens does not.
    too_much = httpx.post(sim.url + "/v1/completions",
                          json={"model": MODEL, "prompt": "a b c", "max_tokens": 510})
    assert too_much.status_code == 400 and "510" in too_much.json()["error"]["message"]


# ----- startup, load, prefix cache, disconnects --------------------------------------


def test_port_refuses_connections_until_model_loaded(spawn) -> None:
    # A load that outlasts the test: the port stays closed for as long as the test looks.
    sim = spawn("--startup-delay", "600", wait=False)
    sim.wait_for_output(LOADING_PREFIX)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((sim.host, sim.port), timeout=2).close()
    # The refusal happened while loading, not because the process failed.
    assert sim.is_running() and READY_PREFIX not in sim.log_text()

    # "Loading finishes": the loading process is stopped (SIGTERM while loading is a clean
    # stop) and the simulator starts again on the same port without the delay.
    finish_startup(sim)
    assert "vllm_sim stopped before it finished loading" in sim.log_text()
    assert httpx.get(sim.url + "/health").status_code == 200
    assert sdk(sim).completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text


def test_startup_delay_ends_by_itself(spawn) -> None:
    # Longer than the simulator's own start-up (under 1 s here), so a delay that is not
    # honoured shows.
    started = time.monotonic()
    sim = spawn("--startup-delay", "3", wait=False)
    sim.wait_ready(timeout=30)
    # The port opened on its own, and not before the delay had passed since the process
    # was started (a slow machine only makes this later).
    assert time.monotonic() - started >= 3
    log = sim.log_text(current_run=True)
    assert log.index(LOADING_PREFIX) < log.index(READY_PREFIX)
    assert httpx.get(sim.url + "/health").status_code == 200


def test_max_num_seqs_queues_excess_requests(spawn) -> None:
    sim = spawn("--max-num-seqs", "2", "--ttft", "0", "--itl", "0.05")
    # Two streams take both slots and would run for minutes (4000 tokens x 50 ms): the
    # engine stays full until the test lets them go.
    holders = [httpx.Client(timeout=30) for _ in range(2)]
    hold = {"model": MODEL, "prompt": "hold the slot", "max_tokens": 4000, "ignore_eos": True,
            "stream": True}

    def one_request() -> int:
        response = httpx.post(sim.url + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "load test", "max_tokens": 15})
        return response.status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        streams: list[httpx.Response] = []
        chunks = []  # keep the iterators: dropping one closes its stream
        try:
            for client in holders:
                streams.append(client.send(client.build_request(
                    "POST", sim.url + "/v1/completions", json=hold), stream=True))
                chunks.append(streams[-1].iter_bytes())
                assert next(chunks[-1]).startswith(b"data: ")  # it has a slot
            futures = [pool.submit(one_request) for _ in range(4)]

            def queued() -> str | None:
                finished = [f.result() for f in futures if f.done()]  # raises a thread's error
                assert not finished, f"requests answered while both slots were held: {finished}"
                text = sim.metrics_text()
                return text if metric_value(text, "vllm:num_requests_waiting") == 4 else None

            text = wait_until(queued, what="four requests queued behind the two running streams")
            assert metric_value(text, "vllm:num_requests_waiting", model_name=MODEL, engine="0") == 4
            assert metric_value(text, "vllm:num_requests_running", model_name=MODEL, engine="0") == 2
            assert metric_value(text, "vllm:kv_cache_usage_perc", model_name=MODEL) > 0
            assert sim.stats()["max_seen_running"] == 2
        finally:
            for stream in streams:
                stream.close()  # the holders leave mid-stream (aborted): slots go to the queue
            for client in holders:
                client.close()
        statuses = [f.result(timeout=60) for f in futures]
    assert statuses == [200] * 4  # vLLM queues; it never answers 429
    stats = wait_until(lambda: (s := sim.stats())["running"] == 0 and s, what="engine idle")
    assert stats["max_seen_running"] == 2  # never more than --max-num-seqs at once
    assert stats["waiting"] == 0 and stats["completed_total"] == 4 and stats["aborted_total"] == 2
    assert sim.metric("vllm:kv_cache_usage_perc") == 0


def test_repeated_prompt_hits_prefix_cache_and_prefills_faster(spawn) -> None:
    sim = spawn("--ttft", "0", "--itl", "0", "--prefill-per-token", "0.004")
    prompt = " ".join(f"word{i}" for i in range(200))  # 12 full blocks of 16 tokens
    client = sdk(sim)

    started = time.monotonic()
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    cold = time.monotonic() - started
    assert sim.metric("vllm:prefix_cache_hits_total") == 0
    cold_stats = sim.stats()
    assert cold_stats["prefill_tokens_total"] == 200
    assert cold_stats["busy_seconds_total"] == pytest.approx(200 * 0.004)
    # The simulated prefill time was really spent (a slow machine only adds to it).
    assert cold >= 200 * 0.004

    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    warm_stats = sim.stats()

    assert sim.metric("vllm:prefix_cache_queries_total", model_name=MODEL, engine="0") == 400
    assert sim.metric("vllm:prefix_cache_hits_total", model_name=MODEL, engine="0") == 192
    # Faster, as the engine counts it: only the 8 tokens after the 12 cached blocks are
    # computed, so the warm prefill costs 8 x 4 ms of simulated time instead of 200 x 4 ms.
    assert warm_stats["prefill_tokens_total"] - cold_stats["prefill_tokens_total"] == 8
    warm_busy = warm_stats["busy_seconds_total"] - cold_stats["busy_seconds_total"]
    assert warm_busy == pytest.approx(8 * 0.004)


def test_client_disconnect_frees_slot_and_queue_place(spawn) -> None:
    sim = spawn("--max-num-seqs", "1", "--ttft", "0", "--itl", "0.05")
    holder = httpx.Client(timeout=30)
    # 4000 tokens x 50 ms: the stream holds the slot until the test closes it.
    payload = {"model": MODEL, "prompt": "long story", "max_tokens": 4000, "ignore_eos": True,
               "stream": True}
    with holder.stream("POST", sim.url + "/v1/completions", json=payload) as response:
        chunks = response.iter_bytes()  # keep a reference: dropping it closes the stream
        assert next(chunks).startswith(b"data: ")
        assert sim.stats()["running"] == 1

        # A second request waits for the only slot; its client gives up.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(sim.url + "/v1/completions", timeout=httpx.Timeout(30, read=0.5),
                       json={"model": MODEL, "prompt": "queued", "max_tokens": 2})
        wait_until(lambda: sim.stats()["waiting"] == 0 and sim.stats()["aborted_total"] == 1,
                   what="queued request aborted")
        assert sim.stats()["running"] == 1
    holder.close()  # closing mid-stream disconnects the client

    stats = wait_until(lambda: (s := sim.stats())["running"] == 0 and s, what="slot freed")
    assert stats["aborted_total"] == 2 and stats["completed_total"] == 0
    assert sim.metric("vllm:request_success_total", finished_reason="abort") == 2
    # The freed slot serves the next request (with the slot still taken it would queue
    # behind a 200 s stream and time out).
    reply = httpx.post(sim.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "after", "max_tokens": 2})
    assert reply.status_code == 200
    assert sim.stats()["completed_total"] == 1


# ----- shutdown ----------------------------------------------------------------------


def test_sigterm_abort_cuts_streams_and_exits(spawn) -> None:
    sim = spawn("--ttft", "0", "--itl", "0.05", "--shutdown-mode", "abort")
    payload = chat_payload(3000, stream=True, ignore_eos=True)  # 150 s: still going at SIGTERM
    with httpx.stream("POST", sim.url + "/v1/chat/completions", json=payload, timeout=30) as response:
        chunks = response.iter_bytes()
        assert next(chunks).startswith(b"data: ")
        sim.send_signal(signal.SIGTERM)
        rest = b""
        with pytest.raises(STREAM_ERRORS):
            for part in chunks:
                rest += part
    assert b"[DONE]" not in rest
    assert sim.wait(timeout=30) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((sim.host, sim.port), timeout=2).close()


def test_sigterm_drain_finishes_streams_and_rejects_new_requests(spawn) -> None:
    # One slot. A holder stream takes it (4000 tokens x 20 ms: minutes) and a second stream
    # waits for it, so at SIGTERM both are in flight and the drain lasts until the test
    # ends the holder; the drain timeout is far longer than the test.
    sim = spawn("--ttft", "0", "--itl", "0.02", "--max-num-seqs", "1",
                "--shutdown-mode", "drain", "--drain-timeout", "600")
    url = sim.url + "/v1/chat/completions"
    holder_client, client = httpx.Client(timeout=30), httpx.Client(timeout=30)
    try:
        holder = holder_client.send(holder_client.build_request(
            "POST", url, json=chat_payload(4000, stream=True, ignore_eos=True)), stream=True)
        holder_chunks = holder.iter_bytes()  # keep a reference: dropping it closes the stream
        assert next(holder_chunks).startswith(b"data: ")
        queued = client.send(client.build_request(
            "POST", url, json=chat_payload(60, stream=True, ignore_eos=True)), stream=True)
        assert queued.status_code == 200  # headers go out at once; tokens wait for the slot
        wait_until(lambda: sim.stats()["waiting"] == 1, what="the second stream queued")

        sim.send_signal(signal.SIGTERM)
        sim.wait_for_output("vllm_sim draining")  # printed once the drain has begun
        assert "vllm_sim draining: 2 in flight" in sim.log_text(current_run=True)
        assert httpx.get(sim.url + "/health").status_code == 503
        rejected = httpx.post(url, json=chat_payload(2))
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == 503
        # The running stream keeps going during the drain.
        steps = sim.stats()["steps_total"]
        wait_until(lambda: sim.stats()["steps_total"] > steps, what="engine steps while draining")
        assert sim.is_running() and sim.stats()["draining"] is True

        holder.close()  # the holder's client leaves mid-stream: its slot goes to the queued one
        received, error = read_stream(queued)
    finally:
        holder_client.close()
        client.close()
    assert error is None
    events = sse_events(received)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == generate(MODEL, render_chat(MESSAGES), 60, ignore_eos=True).text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # It exits once nothing is in flight, having cut nothing.
    assert sim.wait(timeout=30) == 0
    assert "vllm_sim stopped (0 in-flight requests cut)" in sim.log_text(current_run=True)


# ----- fault knobs -------------------------------------------------------------------


def test_fault_api_merges_validates_and_resets(sim: SimulatorProcess) -> None:
    defaults = sim.faults()
    assert defaults["hang"] is False and defaults["error_status"] is None

    assert sim.set_faults(metrics_delay=0.25)["metrics_delay"] == 0.25
    merged = sim.set_faults(error_mid_stream_after=3)
    assert merged["metrics_delay"] == 0.25 and merged["error_mid_stream_after"] == 3
    assert sim.set_faults(metrics_delay=None)["metrics_delay"] == 0.0

    for bad in ({"no_such_knob": 1}, {"error_status": 200}, {"hang": "yes"},
                {"die_mid_stream_after": -1}):
        status, body = sim.request("POST", "/sim/faults", bad)
        assert status == 400, bad
        assert json.loads(body)["error"]["type"] == "BadRequestError"
    assert sim.faults()["error_mid_stream_after"] == 3  # a bad patch changes nothing
    assert sim.reset_faults() == defaults


def test_fault_die_mid_stream_resets_without_done(sim: SimulatorProcess) -> None:
    sim.set_faults(die_mid_stream_after=3)
    with httpx.stream("POST", sim.url + "/v1/chat/completions",
                      json=chat_payload(10, stream=True)) as response:
        assert response.status_code == 200
        raw, error = read_stream(response)
    assert isinstance(error, STREAM_ERRORS)
    assert b"[DONE]" not in raw
    content = [json.loads(e) for e in sse_events(raw)][1:]
    assert len(content) == 3
    assert all(c["choices"][0]["finish_reason"] is None for c in content)

    # On the wire it is a TCP reset (not a clean close) after the three chunks.
    received, sock_error = raw_post(sim, "/v1/chat/completions", chat_payload(10, stream=True))
    assert isinstance(sock_error, ConnectionResetError)
    assert received.count(b"data: ") == 4 and b"[DONE]" not in received

    # Non-streaming: the connection is reset before any response.
    with pytest.raises(openai.APIConnectionError):
        sdk(sim).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)


def test_fault_kill_process_mid_stream_from_cli_flag(spawn) -> None:
    sim = spawn("--ttft", "0", "--itl", "0", "--kill-process-mid-stream-after", "2")
    with httpx.stream("POST", sim.url + "/v1/chat/completions",
                      json=chat_payload(10, stream=True)) as response:
        raw, error = read_stream(response)
    assert error is not None and b"[DONE]" not in raw
    assert sim.wait(timeout=10) == 1  # os._exit(1): a crash, not a clean exit


def test_fault_hang_never_answers_until_client_leaves(sim: SimulatorProcess) -> None:
    sim.set_faults(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(sim.url + "/v1/chat/completions", json=chat_payload(2),
                   timeout=httpx.Timeout(10, read=0.5))
    assert httpx.get(sim.url + "/health").status_code == 200  # only /v1/* hang
    wait_until(lambda: sim.stats()["inflight"] == 0, what="hung request released")
    sim.set_faults(hang=False)
    assert sdk(sim).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)


@pytest.mark.parametrize("status, err_type", [(500, "InternalServerError"), (502, "BadGatewayError"),
                                              (503, "ServiceUnavailableError")])
def test_fault_error_status(sim: SimulatorProcess, status: int, err_type: str) -> None:
    sim.set_faults(error_status=status)
    response = httpx.post(sim.url + "/v1/chat/completions", json=chat_payload(2))
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == err_type and error["param"] is None
    with pytest.raises(openai.APIStatusError) as info:
        sdk(sim).completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert info.value.status_code == status


def test_fault_unhealthy(sim: SimulatorProcess) -> None:
    sim.set_faults(unhealthy=True)
    assert httpx.get(sim.url + "/health").status_code == 503
    with pytest.raises(openai.InternalServerError):
        sdk(sim).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert httpx.get(sim.url + "/metrics").status_code == 200  # the process still serves metrics
    sim.set_faults(unhealthy=None)
    assert httpx.get(sim.url + "/health").status_code == 200


def test_fault_error_mid_stream_sends_error_event_then_done(sim: SimulatorProcess) -> None:
    sim.set_faults(error_mid_stream_after=2)
    with httpx.stream("POST", sim.url + "/v1/chat/completions",
                      json=chat_payload(10, stream=True)) as response:
        raw, error = read_stream(response)
    assert error is None
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {"error": {
        "message": "Simulated failure during generation.", "type": "InternalServerError",
        "param": None, "code": 500}}
    assert len(events) == 1 + 2 + 2  # role, two content chunks, error, [DONE]

    with pytest.raises(openai.APIError):
        for _ in sdk(sim).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                                  stream=True):
            pass


def test_fault_metrics_delay(sim: SimulatorProcess) -> None:
    sim.set_faults(metrics_delay=0.5)
    started = time.monotonic()
    assert httpx.get(sim.url + "/metrics", timeout=10).status_code == 200
    assert time.monotonic() - started >= 0.5


# ----- metrics -----------------------------------------------------------------------


def test_metrics_current_names_and_labels(sim: SimulatorProcess) -> None:
    before = sim.metric("vllm:time_to_first_token_seconds_count", model_name=MODEL) or 0
    successes = sim.metric("vllm:request_success_total", model_name=MODEL) or 0
    sdk(sim).completions.create(model=MODEL, prompt="count me", max_tokens=2)
    text = sim.metrics_text()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total"):
        assert metric_value(text, name, model_name=MODEL, engine="0") is not None, name
    assert "vllm:gpu_cache_usage_perc" not in text
    assert metric_value(text, "vllm:time_to_first_token_seconds_count", model_name=MODEL) == before + 1
    assert metric_value(text, "vllm:request_success_total", model_name=MODEL) == successes + 1


def test_legacy_metric_names(spawn) -> None:
    sim = spawn("--legacy-metrics", "--ttft", "0", "--itl", "0")
    sdk(sim).completions.create(model=MODEL, prompt=" ".join(["x"] * 40), max_tokens=1)
    text = sim.metrics_text()
    assert metric_value(text, "vllm:gpu_cache_usage_perc", model_name=MODEL, engine="0") == 0
    assert metric_value(text, "vllm:gpu_prefix_cache_queries_total", model_name=MODEL) == 40
    assert metric_value(text, "vllm:gpu_prefix_cache_hits_total", model_name=MODEL) == 0
    for current in ("vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                    "vllm:prefix_cache_hits_total"):
        assert current not in text


def test_a_lone_surrogate_is_a_400_as_in_vllm(spawn) -> None:
    sim = spawn()
    body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\ud800 hi"}]}'
    resp = httpx.post(sim.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "BadRequestError" and "surrogates" in resp.json()["error"]["message"]
