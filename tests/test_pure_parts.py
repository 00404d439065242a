"""Unit tests for the small pure pieces: config, request parsing, pod rules, load parsing, metrics."""

from __future__ import annotations

import json

import pytest

from serve_app.config import ConfigError, KubernetesDiscovery, load_config
from serve_app.control.discovery.pods import endpoint_from_pod
from serve_app.ingress.errors import GatewayError
from serve_app.control.load_metrics import parse_load
from serve_app.metrics import MetricsAggregator, RequestMetrics, render
from serve_app.ingress.parsing import parse_request
from serve_app.replicas import ReplicaState

# -- config ------------------------------------------------------------------------------


def test_empty_config_is_the_local_demo() -> None:
    cfg = load_config({})
    assert cfg.discovery.kind == "static"
    assert cfg.simulators is not None and cfg.simulators.replicas == 3
    assert cfg.static_urls() == ["http://127.0.0.1:8101", "http://127.0.0.1:8102", "http://127.0.0.1:8103"]


def test_bad_config_names_each_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"router": "fastest", "timeouts": {"connect_s": 0}, "typo_field": 1})
    text = str(info.value)
    assert "router: Value error, unknown router 'fastest'" in text
    assert "timeouts.connect_s" in text
    assert "typo_field" in text


def test_simulators_rejected_with_kubernetes() -> None:
    with pytest.raises(ConfigError, match="simulators: only valid with discovery.kind=static"):
        load_config({"discovery": {"kind": "kubernetes"}, "simulators": {"replicas": 1}})


def test_static_urls_need_a_scheme() -> None:
    with pytest.raises(ConfigError, match="must start with http"):
        load_config({"discovery": {"kind": "static", "urls": ["10.0.0.1:8000"]}})


def test_holds_are_bounded_below_the_gateway_slots_and_per_model() -> None:
    # Held requests each occupy one of the Gateway's Serve slots (max_ongoing_requests).
    hold = load_config({}).hold
    assert hold.limits(1000) == (500, 250)  # half the slots in all; half of that per model
    assert hold.limits(8) == (4, 2)
    assert load_config({"hold": {"max_waiting": 100, "max_waiting_per_model": 10}}).hold.limits(1000) == (100, 10)
    assert load_config({"hold": {"max_waiting": 0}}).hold.limits(1000) == (0, 0)
    with pytest.raises(ConfigError) as info:
        load_config({"hold": {"max_waiting": 1024}}).hold.limits(1000)
    assert "hold.max_waiting (1024) must be below the Gateway's max_ongoing_requests (1000)" in str(info.value)
    with pytest.raises(ConfigError, match="hold: Value error, max_waiting_per_model .* must not exceed max_waiting"):
        load_config({"hold": {"max_waiting": 10, "max_waiting_per_model": 20}})


# -- parsing -----------------------------------------------------------------------------


def _parse(path: str, payload: object, session: str | None = None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_request(path, body, session)


def test_parse_chat() -> None:
    parsed = _parse("/v1/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "user": "u1"})
    assert parsed.stream and parsed.facts.model == "m"
    assert parsed.facts.session_key == "u1"
    assert _parse("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}, "s").facts.session_key == "s"


def test_parse_hashes_the_whole_conversation_in_blocks() -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    first = _parse("/v1/chat/completions", {"model": "m", "messages": [system, {"role": "user", "content": "a" * 200}]}).facts
    second = _parse("/v1/chat/completions", {"model": "m", "messages": [system, {"role": "user", "content": "b" * 200}]}).facts
    # 600 bytes of system prompt: the same leading blocks, then they part.
    shared = sum(1 for a, b in zip(first.blocks, second.blocks) if a == b)
    assert shared >= 9 and first.blocks != second.blocks
    assert first.block_tokens == 16 and 190 < first.prompt_tokens < 250  # ~800 bytes / 4
    # A conversation that grows keeps its earlier blocks as a prefix (multi-turn).
    turn2 = _parse("/v1/chat/completions", {"model": "m", "messages": [
        system, {"role": "user", "content": "a" * 200}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "more " * 40},
    ]}).facts
    assert turn2.blocks[: len(first.blocks) - 1] == first.blocks[:-1]
    # Roles count: the same words said by someone else are another prompt.
    other_role = _parse("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": system["content"]}, {"role": "user", "content": "a" * 200}]}).facts
    assert other_role.blocks[0] != first.blocks[0]
    # Equal prompts meet on the same affinity key; a session key overrides it.
    assert first.affinity_key == second.affinity_key
    with_session = _parse("/v1/chat/completions", {"model": "m", "user": "alice", "messages": [system]}).facts
    assert with_session.affinity_key != first.affinity_key


@pytest.mark.parametrize("depth", [200, 900, 5000, 100_000])
def test_deeply_nested_bodies_are_a_400_not_a_500(depth: int) -> None:
    body = b'{"model": "m", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(GatewayError) as info:
        parse_request("/v1/chat/completions", body, None)
    assert info.value.status == 400
    nested_content = {"model": "m", "messages": [{"role": "user", "content": None}]}
    payload = json.dumps(nested_content).replace("null", "[" * depth + "]" * depth).encode()
    try:
        facts = parse_request("/v1/chat/completions", payload, None).facts
        assert facts.model == "m"  # shallow enough to route on
    except GatewayError as err:
        assert err.status == 400


def test_parse_survives_a_lone_surrogate() -> None:
    facts = _parse("/v1/completions", b'{"model": "m", "prompt": "\\ud800 ' + b"x" * 100 + b'"}').facts
    assert facts.blocks and facts.prompt_tokens > 0


@pytest.mark.parametrize(
    "path, payload, fragment",
    [
        ("/v1/completions", b"{not json", "not valid JSON"),
        ("/v1/completions", b"", "empty"),
        ("/v1/completions", [1, 2], "JSON object"),
        ("/v1/completions", {"prompt": "x"}, "`model` is required"),
        ("/v1/completions", {"model": 3, "prompt": "x"}, "`model` is required"),
        ("/v1/completions", {"model": "m", "prompt": "x", "stream": "yes"}, "`stream` must be a boolean"),
        ("/v1/completions", {"model": "m"}, "`prompt` is required"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "`messages`"),
        ("/v1/chat/completions", {"model": "m", "messages": ["hi"]}, "`messages`"),
        ("/v1/embeddings", {"model": "m"}, "`input` is required"),
    ],
)
def test_parse_rejects_malformed_with_400(path: str, payload: object, fragment: str) -> None:
    with pytest.raises(GatewayError) as info:
        _parse(path, payload)
    assert info.value.status == 400
    assert fragment in info.value.message
    body = json.loads(info.value.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}


# -- pod rules ---------------------------------------------------------------------------


def _pod(*, ip: str | None = "10.1.2.3", phase: str = "Running", ready: bool = True, deleting: bool = False, labels: dict | None = None) -> dict:
    meta = {"name": "p1", "namespace": "ns", "labels": labels if labels is not None else {"llm-gateway/model": "llama"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


K8S = KubernetesDiscovery()


def test_ready_pod() -> None:
    endpoint = endpoint_from_pod(_pod(), K8S)
    assert endpoint is not None
    assert (endpoint.replica_id, endpoint.url, endpoint.models, endpoint.state) == ("ns/p1", "http://10.1.2.3:8000", ("llama",), ReplicaState.READY)


@pytest.mark.parametrize(
    "pod, state",
    [
        (_pod(deleting=True), ReplicaState.DRAINING),
        (_pod(deleting=True, ready=False, ip=None), ReplicaState.DRAINING),
        (_pod(ip=None), ReplicaState.PENDING),
        (_pod(ready=False), ReplicaState.PENDING),
        (_pod(phase="Pending"), ReplicaState.PENDING),
    ],
)
def test_pod_states(pod: dict, state: ReplicaState) -> None:
    endpoint = endpoint_from_pod(pod, K8S)
    assert endpoint is not None and endpoint.state is state


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_gone(phase: str) -> None:
    assert endpoint_from_pod(_pod(phase=phase), K8S) is None


def test_model_from_annotation_when_no_label() -> None:
    pod = _pod(labels={})
    pod["metadata"]["annotations"] = {"llm-gateway/model": "org/model-7b"}
    endpoint = endpoint_from_pod(pod, K8S)
    assert endpoint is not None and endpoint.models == ("org/model-7b",)


def test_port_label_and_ipv6() -> None:
    endpoint = endpoint_from_pod(_pod(ip="fd00::5", labels={"llm-gateway/port": "9000"}), K8S)
    assert endpoint is not None and endpoint.url == "http://[fd00::5]:9000" and endpoint.models == ()


# -- load metrics ------------------------------------------------------------------------


def test_parse_load_current_and_legacy_names() -> None:
    text = (
        '# HELP vllm:num_requests_running x\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
    )
    load = parse_load(text)
    assert (load.running, load.waiting, load.kv_cache_usage) == (4, 2, 0.25)
    assert parse_load('vllm:gpu_cache_usage_perc{model_name="a b"} 0.5\n').kv_cache_usage == 0.5
    assert parse_load("garbage\nvllm:num_requests_running{x} notanumber\n").running == 0


# -- metrics aggregation -----------------------------------------------------------------


def test_metrics_sum_across_ingress_replicas_and_drop_stale_gauges() -> None:
    now = [0.0]
    agg = MetricsAggregator(gauge_ttl_s=5.0, clock=lambda: now[0])
    a, b = RequestMetrics(), RequestMetrics()
    for m in (a, b):
        m.started("m")
        m.finished("m", 200, "r1", 0.1)
    a.started("m")  # one still in flight on a
    agg.push("a", a.export())
    agg.push("b", b.export())
    text = render(agg.merged()).decode()
    assert 'gateway_requests_total{model="m",replica="r1",status="200"} 2.0' in text
    assert 'gateway_requests_in_flight{model="m"} 1.0' in text
    assert 'gateway_request_duration_seconds_count{model="m"} 2.0' in text
    now[0] = 10.0  # a and b stop pushing: counters stay, gauges go
    agg.push("b", b.export())
    text = render(agg.merged()).decode()
    assert 'gateway_requests_total{model="m",replica="r1",status="200"} 2.0' in text
    assert 'gateway_requests_in_flight{model="m"} 0.0' in text


# -- background loops --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_dead_background_loop_fails_the_health_check() -> None:
    import asyncio

    from serve_app.background import BackgroundLoops

    loops = BackgroundLoops()
    crashed = asyncio.Event()

    async def healthy() -> None:
        await asyncio.Event().wait()

    async def crashing() -> None:
        crashed.set()
        raise ValueError("boom")

    loops.start("healthy", healthy())
    loops.check()
    loops.start("crashing", crashing())
    await crashed.wait()
    await asyncio.sleep(0)  # let the done-callback run
    with pytest.raises(RuntimeError, match="boom"):
        loops.check()
    loops.cancel()


def test_kubernetes_failures_are_described_for_operators() -> None:
    from kubernetes.client.exceptions import ApiException

    from serve_app.control.discovery.kubernetes import describe_failure

    forbidden = describe_failure(ApiException(status=403, reason="Forbidden"), "vllm")
    assert "403" in forbidden and "namespace 'vllm'" in forbidden and "list and watch on pods" in forbidden
    assert "401" in describe_failure(ApiException(status=401), None)
    assert describe_failure(ConnectionRefusedError("nope"), None).startswith("Kubernetes API unreachable")
