"""The whole gateway on Kubernetes discovery, against a real kube-apiserver + etcd.

There is no kubelet: the test plays it (controlplane.kubelet). Pod IPs point at
simulators listening on their own loopback addresses (127.0.0.x), so a request that
the gateway routes to a pod really reaches that pod's "vLLM".
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from controlplane import kubelet
from tests.support import SustainedLoad, wait_for_event, wait_until
from vllm_sim.testing import SimulatorProcess

pytestmark = pytest.mark.timeout(240)

MODEL = "sim-model"
CHAT = [{"role": "user", "content": "hello pods"}]
_addresses = itertools.count(2)
LOAD_S = 30.0


@pytest.fixture
def pod_sims() -> Iterator[Callable[..., SimulatorProcess]]:
    """Simulators on distinct loopback IPs, like pods on distinct pod IPs."""
    started: list[SimulatorProcess] = []

    def start(*args: str) -> SimulatorProcess:
        sim = SimulatorProcess(["--model", MODEL, "--ttft", "0.01", "--itl", "0.002", *args], host=f"127.0.0.{next(_addresses)}")
        sim.start().wait_ready(timeout=30)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def k8s_gateway(gateway, control_plane, k8s_namespace):
    def deploy(**overrides):
        discovery = {
            "kind": "kubernetes",
            "namespace": k8s_namespace,
            "label_selector": "app=vllm",
            "kubeconfig": str(control_plane.admin_kubeconfig_path),
        }
        return gateway([], discovery=discovery, **overrides)

    return deploy


def make_pod(api, ns: str, name: str, sim: SimulatorProcess, ready: bool = True) -> str:
    labels = {"app": "vllm", "llm-gateway/model": MODEL, "llm-gateway/port": str(sim.port)}
    kubelet.create_pod(api, ns, name, labels=labels, ip=sim.host, ready=ready, port=sim.port)
    return f"{ns}/{name}"


ROUND_ROBIN = {"x-gateway-router": "round_robin"}


def test_ready_pods_are_routable_and_unready_ones_are_not(k8s_gateway, k8s_api_client, k8s_namespace, pod_sims) -> None:
    ns, api = k8s_namespace, k8s_api_client
    a, b = pod_sims(), pod_sims()
    pod_a = make_pod(api, ns, "vllm-a", a)
    pod_b = make_pod(api, ns, "vllm-b", b, ready=False)
    gw = k8s_gateway()
    gw.wait_states({pod_a: "READY", pod_b: "PENDING"})
    assert set(gw.served_by(10, extra_headers=ROUND_ROBIN)) == {pod_a}

    kubelet.set_pod_status(api, ns, "vllm-b", ready=True, pod_ip=b.host)
    gw.wait_states({pod_b: "READY"})
    assert set(gw.served_by(10, extra_headers=ROUND_ROBIN)) == {pod_a, pod_b}

    kubelet.set_pod_status(api, ns, "vllm-a", ready=False, pod_ip=a.host)  # readiness probe failing
    gw.wait_states({pod_a: "PENDING"})
    before = a.stats()["requests_total"]
    assert set(gw.served_by(10, extra_headers=ROUND_ROBIN)) == {pod_b}
    assert a.stats()["requests_total"] == before

    kubelet.set_pod_status(api, ns, "vllm-a", ready=True, pod_ip=a.host)
    gw.wait_states({pod_a: "READY"})
    assert pod_a in gw.served_by(10, extra_headers=ROUND_ROBIN)


def test_terminating_pod_finishes_its_stream_and_gets_nothing_new(k8s_gateway, k8s_api_client, k8s_namespace, pod_sims) -> None:
    ns, api = k8s_namespace, k8s_api_client
    a, b = pod_sims("--itl", "0.1"), pod_sims()  # 200 tokens x 100 ms: a stream of about 20 s
    pod_a = make_pod(api, ns, "vllm-a", a)
    pod_b = make_pod(api, ns, "vllm-b", b, ready=False)
    gw = k8s_gateway(retry_after_s=4)
    gw.wait_states({pod_a: "READY"})

    started = threading.Event()

    def long_stream() -> bytes:
        payload = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "stream": True, "ignore_eos": True}
        received: list[bytes] = []
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=payload, timeout=60) as resp:
            assert resp.status_code == 200, resp.read()
            assert resp.headers["x-gateway-replica"] == pod_a
            for chunk in resp.iter_raw():
                received.append(chunk)
                started.set()
        return b"".join(received)

    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(long_stream)
        wait_for_event(started, reader, 30, "the stream on pod a to start")
        kubelet.set_pod_status(api, ns, "vllm-b", ready=True, pod_ip=b.host)
        gw.wait_states({pod_b: "READY"})
        kubelet.terminate_pod(api, ns, "vllm-a", grace_seconds=60)  # stays Terminating: no kubelet
        gw.wait_states({pod_a: "DRAINING"})
        assert a.stats()["running"] == 1  # our stream is still under way on the terminating pod
        requests_on_a = a.stats()["requests_total"]
        assert set(gw.served_by(15, extra_headers=ROUND_ROBIN)) == {pod_b}
        assert a.stats()["requests_total"] == requests_on_a  # not one new request on the terminating pod
        body = reader.result(timeout=60)  # the stream on the terminating pod, to its end
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body

    kubelet.terminate_pod(api, ns, "vllm-b", grace_seconds=60)  # the last READY pod of the model
    gw.wait_states({pod_b: "DRAINING"})
    for _ in range(5):
        with pytest.raises(openai.APIStatusError) as info:
            gw.sdk().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "4"


def test_pod_deleted_during_watch_outage_is_gone_after_reconnect(
    k8s_gateway, k8s_api_client, k8s_namespace, control_plane, pod_sims
) -> None:
    ns, api = k8s_namespace, k8s_api_client
    a, b = pod_sims(), pod_sims()
    pod_a = make_pod(api, ns, "vllm-a", a)
    pod_b = make_pod(api, ns, "vllm-b", b)
    gw = k8s_gateway()
    gw.wait_states({pod_a: "READY", pod_b: "READY"})

    control_plane.stop_apiserver()
    try:
        stale = wait_until(
            lambda: (r := httpx.get(gw.url + "/readyz", timeout=5).json())["stale"] and r, 30, "the view to turn stale"
        )
        assert stale["ready"] and stale["stale_since"] is not None
        assert set(gw.served_by(10, extra_headers=ROUND_ROBIN)) == {pod_a, pod_b}  # no mass 503 while the API server is away
    finally:
        control_plane.start_apiserver()
    kubelet.force_delete_pod(api, ns, "vllm-a")  # most likely while our watch is still backing off
    wait_until(lambda: pod_a not in gw.states(), 60, "the deleted pod to leave the table")
    wait_until(lambda: not httpx.get(gw.url + "/readyz", timeout=5).json()["stale"], 30, "the view to be fresh again")
    requests_on_a = a.stats()["requests_total"]  # its simulator still runs: traffic would succeed
    assert set(gw.served_by(15, extra_headers=ROUND_ROBIN)) == {pod_b}
    assert a.stats()["requests_total"] == requests_on_a


def test_rolling_update_of_pods_under_load_loses_nothing(
    k8s_gateway, k8s_api_client, k8s_namespace, pod_sims
) -> None:
    """A Deployment rollout as the kubelet and controller would play it, under 16 SDK clients.

    New pod Ready -> old pod Terminating (deletionTimestamp: DRAINING at once) -> its vLLM
    drains (SIGTERM, finishes in-flight, refuses new) -> exits -> the pod is deleted.
    """
    ns, api = k8s_namespace, k8s_api_client
    drain = ("--shutdown-mode", "drain", "--drain-timeout", "20", "--itl", "0.01")
    live: list[tuple[str, SimulatorProcess]] = []
    for i in range(3):
        sim = pod_sims(*drain)
        live.append((make_pod(api, ns, f"vllm-{i}", sim), sim))
    gw = k8s_gateway()
    gw.wait_states({pod: "READY" for pod, _ in live})
    generation = 3
    with SustainedLoad(gw.url) as load:
        # At least three replacements, and at least LOAD_S of load: on a slow machine the load
        # lasts longer, it never counts fewer replacements.
        while generation - 3 < 3 or load.elapsed() < LOAD_S:
            sim = pod_sims(*drain)
            new_pod = make_pod(api, ns, f"vllm-{generation}", sim)
            generation += 1
            gw.wait_states({new_pod: "READY"})
            old_pod, old_sim = live.pop(0)
            name = old_pod.split("/", 1)[1]
            kubelet.terminate_pod(api, ns, name, grace_seconds=60)
            gw.wait_states({old_pod: "DRAINING"})
            old_sim.send_signal(signal.SIGTERM)
            old_sim.wait(timeout=40)
            kubelet.force_delete_pod(api, ns, name)
            live.append((new_pod, sim))
    report = load.result()
    assert generation - 3 >= 3, "fewer than three pods were replaced during the load"
    assert report.started == len(report.outcomes) > 100
    bad = [o for o in report.outcomes if o.kind != "ok"]
    assert not bad, report.summary() + "".join(f"\n  {o.kind} {o.replica}: {o.error}" for o in bad[:10])


def test_health_actor_restarted_while_apiserver_is_down_keeps_the_last_view(
    k8s_gateway, k8s_api_client, k8s_namespace, control_plane, pod_sims
) -> None:
    """A new health actor that cannot list pods has an empty, unsynced table. The ingress keeps
    its synced view (now stale) and keeps routing on it; while discovery is stale no model is
    called unknown (503 + Retry-After + reason, never a 404 that SDKs do not retry)."""
    import ray

    ns, api = k8s_namespace, k8s_api_client
    a = pod_sims()
    pod_a = make_pod(api, ns, "vllm-a", a)
    gw = k8s_gateway(retry_after_s=3)
    gw.wait_states({pod_a: "READY"})
    before = gw.table()
    with pytest.raises(openai.NotFoundError):  # a fresh, synced view: unknown is unknown
        gw.sdk().chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    (actor,) = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True) if "ReplicaHealth" in x["name"]]

    control_plane.stop_apiserver()
    try:
        wait_until(lambda: httpx.get(gw.url + "/readyz", timeout=5).json()["stale"], 30, "the view to turn stale")
        ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)

        def heard_from_the_new_actor() -> dict | None:
            table = gw.table()
            restarted = table["epoch"] != before["epoch"] or "new health actor" in table["discovery"]["message"]
            return table if restarted else None

        table = wait_until(heard_from_the_new_actor, 90, "the ingress to hear from the restarted health actor")
        assert set(gw.served_by(5, extra_headers=ROUND_ROBIN)) == {pod_a}
        assert table["epoch"] == before["epoch"], "the synced view was swapped for the new actor's empty one"
        assert {r["replica_id"]: r["state"] for r in table["replicas"]} == {pod_a: "READY"}
        assert table["discovery"]["stale"] and "unreachable" in table["discovery"]["message"]
        with pytest.raises(openai.APIStatusError) as info:
            gw.sdk().chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "3"
        assert info.value.response.headers["x-gateway-reason"] == "discovery_stale"
        ready = httpx.get(gw.url + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["stale"]  # it has synced once: it still serves
    finally:
        control_plane.start_apiserver()
    # The new actor lists, and its first view replaces the kept one.
    wait_until(lambda: gw.table()["epoch"] != before["epoch"], 90, "the restarted actor's synced view")
    assert gw.states() == {pod_a: "READY"}
    assert not httpx.get(gw.url + "/readyz", timeout=5).json()["stale"]
    with pytest.raises(openai.NotFoundError):
        gw.sdk().chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    assert set(gw.served_by(5, extra_headers=ROUND_ROBIN)) == {pod_a}


def test_readyz_is_503_until_discovery_has_synced(gateway, control_plane, k8s_namespace, tmp_path) -> None:
    """Started with credentials for an API server it cannot reach: not ready, and every model is a
    retryable 503 naming the reason, never a 404."""
    unreachable = tmp_path / "unreachable.kubeconfig"
    config = control_plane.admin_kubeconfig_path.read_text()
    unreachable.write_text(config.replace(f"127.0.0.1:{control_plane.port}", "127.0.0.1:1"))
    assert unreachable.read_text() != config
    gw = gateway([], discovery={"kind": "kubernetes", "namespace": k8s_namespace, "kubeconfig": str(unreachable)})
    ready = wait_until(
        lambda: (r := httpx.get(gw.url + "/readyz", timeout=5)).status_code == 503 and "unreachable" in r.text and r,
        60, "/readyz to say why it is not ready",
    )
    assert ready.json()["ready"] is False
    assert "127.0.0.1" not in ready.text  # open to anyone: the kind of problem, not the address
    for model in (MODEL, "no-such-model"):
        with pytest.raises(openai.APIStatusError) as info:
            gw.sdk().chat.completions.create(model=model, messages=CHAT, max_tokens=4)
        assert info.value.status_code == 503, info.value
        assert "127.0.0.1" not in info.value.response.text
        assert info.value.response.headers["retry-after"] == "2"
        assert info.value.response.headers["x-gateway-reason"] == "discovery_not_synced"
