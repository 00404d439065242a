"""The simulator checked against real vLLM: the same requests to both, compared.

What is compared is what the gateway and OpenAI clients depend on: the keys of response
bodies (the simulator may leave out keys real vLLM sends, never invent one), SSE framing
(role chunk, one finish reason, usage chunk, `[DONE]`), error bodies and statuses for an
unknown model and bad input, `/v1/models`, the metric names and labels the gateway reads,
and the KV-event wire format (decoded by the gateway's own consumer).

The simulator runs with real vLLM's CPU settings (block size 128, 2048 blocks, context
2048), so a difference here is drift, not configuration.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import openai
import pytest
import zmq

from routers import PrefixIndex
from routers.prefix import token_blocks
from serve_app.control.load_metrics import CACHE_CONFIG, KV_USAGE, RUNNING, WAITING, parse_load
from serve_app.ingress.kv_events import BlockMap
from tests import real_vllm
from tests.support import wait_until
from vllm_sim.testing import SimulatorProcess

pytestmark = pytest.mark.timeout(1200)

MODEL = real_vllm.MODEL
CHAT = [{"role": "user", "content": "hello world tell me a story"}]
SAMPLING = {"temperature": 0.0, "ignore_eos": True}  # exactly max_tokens from both


@pytest.fixture(scope="session")
def vllm_fleet(request: pytest.FixtureRequest) -> real_vllm.Fleet:
    return real_vllm.fleet(request)


@pytest.fixture(scope="module")
def real(vllm_fleet: real_vllm.Fleet) -> real_vllm.VLLMServer:
    return vllm_fleet.servers(2)[0]  # both start together: the gateway tests use the pair


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    port = real_vllm._port_run(3)
    events = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": f"tcp://*:{port + 1}", "replay_endpoint": f"tcp://*:{port + 2}"}
    proc = SimulatorProcess(
        ["--model", MODEL, "--ttft", "0", "--itl", "0", "--max-model-len", "2048",
         "--block-size", str(real_vllm.BLOCK_SIZE), "--num-gpu-blocks", "2048", "--max-num-seqs", "16",
         "--kv-events-config", json.dumps(events)],
        port=port,
    )
    proc.start().wait_ready(timeout=30)
    yield proc
    proc.stop()
    proc.close()


def both(real: real_vllm.VLLMServer, sim: SimulatorProcess) -> list[tuple[str, str]]:
    return [("real", real.url), ("sim", sim.url)]


def post(url: str, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=120)


def assert_keys_subset(sim_obj: dict, real_obj: dict, where: str) -> None:
    invented = set(sim_obj) - set(real_obj)
    assert not invented, f"{where}: the simulator sends keys real vLLM does not: {sorted(invented)}"


# Keys the OpenAI SDK and the gateway read: both must send them.
NEEDED = {
    "chat": {"id", "object", "created", "model", "choices", "usage"},
    "chat.choice": {"index", "message", "finish_reason"},
    "chat.message": {"role", "content"},
    "completion": {"id", "object", "created", "model", "choices", "usage"},
    "completion.choice": {"index", "text", "finish_reason"},
    "usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
}


def test_chat_and_completion_bodies(real, sim) -> None:
    bodies = {}
    for name, url in both(real, sim):
        chat = post(url, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 5, **SAMPLING})
        text = post(url, "/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 3, **SAMPLING})
        assert chat.status_code == text.status_code == 200, (name, chat.text, text.text)
        bodies[name] = chat.json(), text.json()
    (real_chat, real_text), (sim_chat, sim_text) = bodies["real"], bodies["sim"]
    for kind, r, s in (("chat", real_chat, sim_chat), ("completion", real_text, sim_text)):
        assert NEEDED[kind] <= set(r) and NEEDED[kind] <= set(s), kind
        assert_keys_subset(s, r, kind)
        rc, sc = r["choices"][0], s["choices"][0]
        assert NEEDED[f"{kind}.choice"] <= set(rc) and NEEDED[f"{kind}.choice"] <= set(sc), kind
        assert_keys_subset(sc, rc, f"{kind}.choices[0]")
        assert NEEDED["usage"] <= set(r["usage"]) and NEEDED["usage"] <= set(s["usage"])
        assert_keys_subset(s["usage"], r["usage"], f"{kind}.usage")
        assert (r["object"], rc["finish_reason"]) == (s["object"], sc["finish_reason"]) == (
            "chat.completion" if kind == "chat" else "text_completion", "length")
        assert r["id"].startswith("chatcmpl-" if kind == "chat" else "cmpl-") and s["id"][:4] == r["id"][:4]
    assert_keys_subset(sim_chat["choices"][0]["message"], real_chat["choices"][0]["message"], "chat.message")
    assert NEEDED["chat.message"] <= set(sim_chat["choices"][0]["message"])
    # The same prompt is the same number of tokens under both tokenizers (one word, one token).
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [real_text["usage"][k] for k in counts] == [sim_text["usage"][k] for k in counts] == [2, 3, 5]


def sse_events(url: str, path: str, body: dict) -> list[bytes]:
    """The raw SSE events of a stream (each `data: ...` without its blank line)."""
    with httpx.stream("POST", url + path, json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    return events[:-1]


def stream_shape(events: list[bytes], chat: bool) -> tuple[list[str], list[dict]]:
    """(['role', 'token' x n, 'usage', 'done'] with the token carrying the finish reason marked, chunks)."""
    shape, chunks = [], []
    for event in events:
        assert event.startswith(b"data: "), event
        data = event[len(b"data: "):]
        if data == b"[DONE]":
            shape.append("done")
            continue
        chunk = json.loads(data)
        chunks.append(chunk)
        if not chunk["choices"]:
            shape.append("usage" if chunk.get("usage") else "empty")
            continue
        choice = chunk["choices"][0]
        if chat and choice["delta"].get("role") == "assistant":
            shape.append("role")
        elif choice.get("finish_reason"):
            shape.append(f"finish:{choice['finish_reason']}")
        else:
            shape.append("token")
    return shape, chunks


@pytest.mark.parametrize("usage", [True, False])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_sse_framing(real, sim, path: str, usage: bool) -> None:
    chat = path.endswith("chat/completions")
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "stream": True, **SAMPLING}
    body.update({"messages": CHAT} if chat else {"prompt": "hello world"})
    if usage:
        body["stream_options"] = {"include_usage": True}
    shapes = {}
    for name, url in both(real, sim):
        shape, chunks = stream_shape(sse_events(url, path, body), chat)
        shapes[name] = shape, chunks
    (real_shape, real_chunks), (sim_shape, sim_chunks) = shapes["real"], shapes["sim"]
    expected = (["role"] if chat else []) + ["token"] * 3 + ["finish:length"] + (["usage"] if usage else []) + ["done"]
    assert real_shape == expected, real_shape
    assert sim_shape == expected, sim_shape
    for i, (r, s) in enumerate(zip(real_chunks, sim_chunks)):
        assert_keys_subset(s, r, f"chunk {i}")
        assert r["object"] == s["object"] == ("chat.completion.chunk" if chat else "text_completion")
        if r["choices"]:
            assert_keys_subset(s["choices"][0], r["choices"][0], f"chunk {i} choice")
            if chat:
                assert_keys_subset(s["choices"][0]["delta"], r["choices"][0]["delta"], f"chunk {i} delta")
    if usage:
        assert real_chunks[-1]["usage"]["completion_tokens"] == sim_chunks[-1]["usage"]["completion_tokens"] == 4
        assert_keys_subset(sim_chunks[-1]["usage"], real_chunks[-1]["usage"], "usage chunk")
    # All of a stream's chunks carry one id, chat's role chunk is {"role": "assistant", "content": ""}.
    for chunks in (real_chunks, sim_chunks):
        assert len({c["id"] for c in chunks}) == 1
        if chat:
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


TOO_LONG = " ".join(["hello"] * 2100)  # 2100 tokens for both tokenizers, over the 2048 context
ERROR_CASES = [
    ("unknown model", "/v1/chat/completions", {"model": "no-such-model", "messages": CHAT, "max_tokens": 2}, 404),
    ("malformed JSON", "/v1/chat/completions", b"{bad json", 400),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hello", "max_tokens": 2}, 400),
    ("no prompt", "/v1/completions", {"model": MODEL, "max_tokens": 2}, 400),
    ("max_tokens < 1", "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 0}, 400),
    ("prompt over the context", "/v1/completions", {"model": MODEL, "prompt": TOO_LONG, "max_tokens": 2}, 400),
    ("max_tokens not an integer", "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": "five"}, 400),
    # Not compared: `"stream": "yes"`. Real vLLM's pydantic takes it as true and streams; the
    # simulator answers 400. The gateway answers 400 itself before forwarding, so no client
    # of the gateway can tell.
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_bodies(real, sim, case) -> None:
    _, path, body, status = case
    answers = {name: post(url, path, body) for name, url in both(real, sim)}
    for name, answer in answers.items():
        assert answer.status_code == status, (name, answer.text)
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (name, error)
        assert error["code"] == status and isinstance(error["message"], str) and error["message"], (name, error)
    real_error, sim_error = answers["real"].json()["error"], answers["sim"].json()["error"]
    if status == 404:
        assert real_error["type"] == sim_error["type"] == "NotFoundError"
        # Known, accepted drift: real vLLM names the field at fault in `param` ("model"); the
        # simulator sends null (tests/test_simulator.py pins that). Both are valid OpenAI bodies.
        assert real_error["param"] == "model" and sim_error["param"] in (None, "model")
    # The SDK raises the same exception class for both.
    for answer in answers.values():
        client = openai.OpenAI(base_url="http://x/v1", api_key="x")
        exc = client._make_status_error_from_response(answer)
        assert type(exc) is (openai.NotFoundError if status == 404 else openai.BadRequestError)


def test_models_list(real, sim) -> None:
    cards = {}
    for name, url in both(real, sim):
        listing = openai.OpenAI(base_url=url + "/v1", api_key="x").models.list()
        assert [m.id for m in listing.data] == [MODEL], name
        body = httpx.get(url + "/v1/models", timeout=10).json()
        assert body["object"] == "list"
        cards[name] = body["data"][0]
    assert_keys_subset(cards["sim"], cards["real"], "/v1/models card")
    for key in ("object", "owned_by", "max_model_len", "parent"):
        assert cards["sim"][key] == cards["real"][key], key
    assert isinstance(cards["real"]["created"], int) and isinstance(cards["sim"]["created"], int)


def metric_series(text: str) -> dict[str, set[frozenset[str]]]:
    """name -> the label-name sets it is exported with."""
    found: dict[str, set[frozenset[str]]] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{")
        name = name.split()[0]
        labels = frozenset(part.split("=", 1)[0] for part in rest.rsplit("}", 1)[0].split('",') if "=" in part) if rest else frozenset()
        found.setdefault(name, set()).add(labels)
    return found


def test_metric_names_and_the_load_scrape(real, sim) -> None:
    for name, url in both(real, sim):  # something to count
        assert post(url, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2}).status_code == 200
    real_text, sim_text = real.metrics(), httpx.get(sim.url + "/metrics", timeout=10).text
    real_series, sim_series = metric_series(real_text), metric_series(sim_text)
    invented = set(sim_series) - set(real_series)
    assert not invented, f"the simulator exports series real vLLM does not: {sorted(invented)}"
    read_by_gateway = [RUNNING, WAITING, KV_USAGE[0], CACHE_CONFIG, "vllm:prefix_cache_queries_total",
                       "vllm:prefix_cache_hits_total", "vllm:num_requests_waiting_by_reason"]
    for series in read_by_gateway:
        assert series in real_series, f"real vLLM no longer exports {series}"
        assert series in sim_series, f"the simulator does not export {series}"
    for series in (RUNNING, WAITING, KV_USAGE[0]):
        assert real_series[series] == sim_series[series] == {frozenset({"engine", "model_name"})}, series
    for labels in (real_series[CACHE_CONFIG], sim_series[CACHE_CONFIG]):
        assert all({"block_size", "num_gpu_blocks", "enable_prefix_caching"} <= set(ls) for ls in labels)
    # The gateway's parser reads both alike: the cache size (2048 blocks of 128 on CPU) and an idle replica.
    real_load, sim_load = parse_load(real_text), parse_load(sim_text)
    assert real_load.cache_tokens == sim_load.cache_tokens == 2048 * real_vllm.BLOCK_SIZE
    assert (real_load.running, real_load.waiting) == (sim_load.running, sim_load.waiting) == (0, 0)


def collect_batches(endpoint: str, send: Any, want_blocks: int, timeout: float = 60) -> list[list[bytes]]:
    """Subscribe, run `send()`, and return the multipart messages until `want_blocks` blocks were stored."""
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        # A SUB socket joins asynchronously: send probes until one batch arrives, then the real request.
        messages: list[list[bytes]] = []
        stored = 0
        send()
        deadline = time.monotonic() + timeout
        while stored < want_blocks:
            if not sub.poll(500):
                assert time.monotonic() < deadline, f"no KV events from {endpoint} ({stored} blocks so far)"
                send()  # the first send may have gone out before the subscription took
                continue
            frames = sub.recv_multipart()
            messages.append(frames)
            batch = msgpack.unpackb(frames[-1], raw=False, strict_map_key=False)
            stored += sum(len(e.get("block_hashes") or []) for e in batch[1] if e.get("type") == "BlockStored")
        return messages
    finally:
        sub.close(linger=0)


def test_kv_event_wire_format_decoded_by_the_gateway(real, sim) -> None:
    # Two full blocks of 128 tokens (plus a partial one, never published) under both tokenizers.
    prompt = " ".join(["cache", "prefix", "block", "token"] * 75)  # 300 words = 300 tokens
    per_server: dict[str, tuple[list[list[bytes]], list[dict]]] = {}
    for name, url, kv_port in (("real", real.url, real.kv_port), ("sim", sim.url, sim.port + 1)):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        messages = collect_batches(f"tcp://127.0.0.1:{kv_port}", lambda: post(url, "/v1/completions", body), 2)
        events = []
        for frames in messages:
            assert len(frames) == 3, f"{name}: [topic, seq, payload] expected, got {len(frames)} frames"
            topic, seq, payload = frames
            assert topic == b"" and len(seq) == 8, name
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            assert isinstance(batch, list) and len(batch) == 3, f"{name}: EventBatch is [ts, events, dp_rank]"
            ts, batch_events, rank = batch
            assert isinstance(ts, float) and rank == 0, name
            events += batch_events
        per_server[name] = messages, events
    real_events, sim_events = per_server["real"][1], per_server["sim"][1]
    real_stored = [e for e in real_events if e["type"] == "BlockStored"]
    sim_stored = [e for e in sim_events if e["type"] == "BlockStored"]
    assert real_stored and sim_stored
    assert {e["block_size"] for e in real_stored} == {e["block_size"] for e in sim_stored} == {real_vllm.BLOCK_SIZE}
    assert set(sim_stored[0]) == set(real_stored[0]), (sorted(sim_stored[0]), sorted(real_stored[0]))
    for event in real_stored + sim_stored:
        assert len(event["token_ids"]) == len(event["block_hashes"]) * real_vllm.BLOCK_SIZE
        assert event["medium"] == "GPU"
    # The gateway's consumer turns both into the same number of index entries, keyed by
    # its own chain over the token ids: the request, keyed the same way, finds them.
    for name, events in (("real", real_events), ("sim", sim_events)):
        index = PrefixIndex()
        blocks = BlockMap(name, index, real_vllm.BLOCK_SIZE, 10_000)
        blocks.apply(events)
        assert blocks.unknown_parents == 0, name
        stored_tokens = [t for e in events if e["type"] == "BlockStored" for t in e["token_ids"]]
        keys = token_blocks(stored_tokens, real_vllm.BLOCK_SIZE)
        assert len(keys) >= 2 and index.match(keys[:2]) == {name: 2}, name


def test_kv_event_replay_socket(real, sim) -> None:
    """Both answer a replay request from seq 0 with [empty, topic, seq, payload] frames, then the end marker."""
    for name, port in (("real", real.kv_port + 1), ("sim", sim.port + 2)):
        # Make sure there is something to replay.
        url = real.url if name == "real" else sim.url
        post(url, "/v1/completions", {"model": MODEL, "prompt": " ".join(["replay"] * 130), "max_tokens": 1})
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        try:
            def replayed() -> list[list[bytes]]:
                dealer.send_multipart([b"", (0).to_bytes(8, "big")])
                got = []
                while dealer.poll(5000):
                    frames = dealer.recv_multipart()
                    got.append(frames)
                    if int.from_bytes(frames[-2], "big", signed=True) == -1:
                        return got
                return []

            frames_list = wait_until(replayed, 60, f"{name}: a replay answer")
        finally:
            dealer.close(linger=0)
        *batches, end = frames_list
        assert batches, name
        assert all(len(f) == 4 and f[0] == b"" for f in batches), (name, [len(f) for f in batches])
        assert end[0] == b"" and end[-1] == b"", name
        seqs = [int.from_bytes(f[2], "big", signed=True) for f in batches]
        assert seqs == sorted(seqs) and seqs[0] >= 0, name
