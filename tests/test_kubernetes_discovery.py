"""Kubernetes discovery against a REAL kube-apiserver + etcd (controlplane/).

Each test runs `KubernetesSource(...).run(sink)` on the test's event loop with a real
`ReplicaTable` as the sink, and plays the kubelet with `controlplane.kubelet`: pods are
created bound to a node, their status is patched, and they are deleted with a grace
period (Terminating) or with grace 0 (gone). Conditions are awaited by polling with a
deadline, never by sleeping.

The table's own state of a replica the source calls READY stays PENDING until a health
probe passes (that is the table's job, not discovery's), so the source's view is read
from `table.endpoint(id)`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.watch.watch import iter_resp_lines

from controlplane import kubelet
from serve_app.config import KubernetesDiscovery
from serve_app.control.discovery import kubernetes as kubernetes_discovery
from serve_app.control.discovery.kubernetes import KubernetesSource, _WatchExpired
from serve_app.replicas import DiscoveryStatus, Endpoint, ReplicaState
from serve_app.control.table import ReplicaTable

MODEL_LABEL = "llm-gateway/model"
PORT_LABEL = "llm-gateway/port"
VLLM = {"app": "vllm"}

# Generous: other test suites (Ray) may share this 2-core machine.
EVENT_TIMEOUT = 30.0


# ----------------------------------------------------------------------------- helpers


async def wait_for(predicate: Callable[[], Any], timeout: float = EVENT_TIMEOUT, what: str = "condition") -> Any:
    """Poll `predicate` on the event loop until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking Kubernetes/control-plane call off the event loop (the loop runs the source's sink and the proxy)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class RecordingSink:
    """The real ReplicaTable as the sink, with a log of every call the source made."""

    def __init__(self) -> None:
        self.table = ReplicaTable(epoch="test")
        self.calls: list[tuple[str, Any]] = []

    def upsert(self, endpoint: Endpoint) -> None:
        self.calls.append(("upsert", endpoint))
        self.table.upsert(endpoint)

    def remove(self, replica_id: str) -> None:
        self.calls.append(("remove", replica_id))
        self.table.remove(replica_id)

    def replace_all(self, endpoints: Iterable[Endpoint]) -> None:
        endpoints = list(endpoints)
        self.calls.append(("replace_all", endpoints))
        self.table.replace_all(endpoints)

    def set_discovery_status(self, status: DiscoveryStatus) -> None:
        self.calls.append(("status", status))
        self.table.set_discovery_status(status)

    def count(self, name: str) -> int:
        return sum(1 for call, _ in self.calls if call == name)

    def mentioned(self, replica_id: str) -> bool:
        for call, arg in self.calls:
            if call == "upsert" and arg.replica_id == replica_id:
                return True
            if call == "remove" and arg == replica_id:
                return True
            if call == "replace_all" and any(ep.replica_id == replica_id for ep in arg):
                return True
        return False

    # -- what the source says about one pod

    def source_state(self, replica_id: str) -> ReplicaState | None:
        endpoint = self.table.endpoint(replica_id)
        return endpoint.state if endpoint else None


def discovery(namespace: str | None, kubeconfig: Any, **overrides: Any) -> KubernetesDiscovery:
    return KubernetesDiscovery(
        namespace=namespace,
        kubeconfig=str(kubeconfig),
        **{"resync_period_s": 300.0, **overrides},
    )


@contextlib.asynccontextmanager
async def running_source(
    cfg: KubernetesDiscovery,
    sink: RecordingSink | None = None,
    *,
    api_client_factory: Callable[[], Any] | None = None,
    wait_synced: bool = True,
) -> AsyncIterator[RecordingSink]:
    """Run the source as the health actor does (a task on the loop), cancel it at the end."""
    sink = sink or RecordingSink()
    before = set(threading.enumerate())
    source = KubernetesSource(cfg, api_client_factory=api_client_factory)
    task = asyncio.create_task(source.run(sink), name="k8s-discovery")
    body_passed = False
    try:
        if wait_synced:
            await wait_for(lambda: sink.table.discovery.synced or task.done(), what="first listing")
            if task.done():
                task.result()  # raises what run() raised
            assert sink.table.discovery.synced, "run() returned early"
        yield sink
        body_passed = True
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Don't let a watch thread of this test outlive it into the next one.
        started = [t for t in threading.enumerate() if t not in before and t.name == "pod-watch"]
        deadline = time.monotonic() + 30
        while any(t.is_alive() for t in started) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = [t for t in started if t.is_alive()]
        # Only when the test itself passed: otherwise its own failure is the one to see.
        if body_passed:
            assert not leftover, f"the watch thread outlived the cancelled source: {leftover}"


def rid(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def core_api(api: Any) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def etcd_post(cp: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        cp.etcd_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def compact_etcd(cp: Any) -> int:
    """Compact etcd's history up to its current revision (what the apiserver does every 5 min)."""
    header = etcd_post(cp, "/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]
    revision = int(header["revision"])
    etcd_post(cp, "/v3/kv/compaction", {"revision": revision, "physical": True})
    return revision


def first_watch_event(api: Any, namespace: str, resource_version: str) -> dict[str, Any] | None:
    response = core_api(api).list_namespaced_pod(
        namespace, watch=True, resource_version=resource_version, timeout_seconds=2, _preload_content=False
    )
    try:
        for line in iter_resp_lines(response):
            return json.loads(line)
        return None
    finally:
        response.close()
        response.release_conn()


class CuttableProxy:
    """A loopback TCP proxy in front of the apiserver that a test can cut and restore.

    TLS passes through untouched. `cut()` aborts every open connection and makes new ones
    fail at once, so the source sees the API server vanish while it stays up for the test.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.is_cut = False
        self.accepted = 0
        self._server: asyncio.base_events.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._open.discard(w)

    def cut(self) -> None:
        self.is_cut = True
        for writer in list(self._open):
            writer.transport.abort()

    def restore(self) -> None:
        self.is_cut = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def kubeconfig_via(cp: Any, port: int, path: Any) -> Any:
    """The admin kubeconfig, pointed at 127.0.0.1:`port` (the apiserver's cert is for 127.0.0.1)."""
    cfg = json.loads(cp.admin_kubeconfig_path.read_text())
    for cluster in cfg["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{port}"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def admin(k8s_api_client: Any) -> client.CoreV1Api:
    return core_api(k8s_api_client)


@pytest.fixture
def extra_namespace(control_plane: Any, admin: client.CoreV1Api) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    admin.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    if control_plane.apiserver_running:
        admin.delete_namespace(name)


# ----------------------------------------------------------------------------- lifecycle


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_pod_pending_then_ready_with_ip_and_port_override(control_plane, k8s_namespace, admin):
    ns = k8s_namespace
    labels = {**VLLM, MODEL_LABEL: "m1", PORT_LABEL: "9001"}
    async with running_source(discovery(ns, control_plane.admin_kubeconfig_path)) as sink:
        table = sink.table
        await blocking(kubelet.create_pod, admin, ns, "p0", labels)
        await wait_for(lambda: table.endpoint(rid(ns, "p0")), what="the new pod in the table")
        endpoint = table.endpoint(rid(ns, "p0"))
        assert endpoint.state is ReplicaState.PENDING
        assert endpoint.url == ""  # no IP yet
        assert table.state(rid(ns, "p0")) is ReplicaState.PENDING

        # Running with an IP but not Ready yet: still PENDING, now with an address.
        await blocking(kubelet.set_pod_status, admin, ns, "p0", ready=False, pod_ip="10.1.0.5")
        await wait_for(lambda: table.endpoint(rid(ns, "p0")).url, what="the pod's URL")
        assert table.endpoint(rid(ns, "p0")).state is ReplicaState.PENDING

        await blocking(kubelet.set_pod_status, admin, ns, "p0", ready=True, pod_ip="10.1.0.5")
        await wait_for(lambda: sink.source_state(rid(ns, "p0")) is ReplicaState.READY, what="READY from the source")
        endpoint = table.endpoint(rid(ns, "p0"))
        assert endpoint.url == "http://10.1.0.5:9001"
        assert endpoint.models == ("m1",)
        assert endpoint.source == f"pod {ns}/p0"
        # The table admits it only after a health probe passes.
        assert table.state(rid(ns, "p0")) is ReplicaState.PENDING
        table.probe_result(rid(ns, "p0"), ok=True)
        assert table.state(rid(ns, "p0")) is ReplicaState.READY
        assert "m1" in table.snapshot().known_models

        # The port can also come from an annotation; without either, the configured port.
        await blocking(
            kubelet.create_pod, admin, ns, "p1", VLLM, ip="10.1.0.6", ready=True, annotations={PORT_LABEL: "9100"}
        )
        await blocking(kubelet.create_pod, admin, ns, "p2", VLLM, ip="10.1.0.7", ready=True)
        # A port that is no port is ignored, like a non-number.
        await blocking(kubelet.create_pod, admin, ns, "p3", {**VLLM, PORT_LABEL: "99999"}, ip="10.1.0.8", ready=True)
        await wait_for(
            lambda: all(sink.source_state(rid(ns, p)) is ReplicaState.READY for p in ("p1", "p2", "p3")),
            what="p1, p2 and p3 READY",
        )
        assert table.endpoint(rid(ns, "p1")).url == "http://10.1.0.6:9100"
        assert table.endpoint(rid(ns, "p2")).url == "http://10.1.0.7:8000"
        assert table.endpoint(rid(ns, "p2")).models == ()  # learnt from /v1/models later
        assert table.endpoint(rid(ns, "p3")).url == "http://10.1.0.8:8000"


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_graceful_delete_drains_then_force_delete_removes(control_plane, k8s_namespace, admin):
    ns = k8s_namespace
    async with running_source(discovery(ns, control_plane.admin_kubeconfig_path)) as sink:
        table = sink.table
        await blocking(kubelet.create_pod, admin, ns, "p0", VLLM, ip="10.1.0.5", ready=True)
        await blocking(kubelet.create_pod, admin, ns, "p1", VLLM, ip="10.1.0.6", ready=True)
        await wait_for(lambda: sink.source_state(rid(ns, "p0")) is ReplicaState.READY, what="p0 READY")

        terminating = await blocking(kubelet.terminate_pod, admin, ns, "p0", grace_seconds=30)
        assert terminating.metadata.deletion_timestamp is not None
        await wait_for(lambda: sink.source_state(rid(ns, "p0")) is ReplicaState.DRAINING, what="p0 DRAINING")
        assert table.state(rid(ns, "p0")) is ReplicaState.DRAINING
        assert table.endpoint(rid(ns, "p0")).url == "http://10.1.0.5:8000"  # in-flight requests still reach it
        # Still Ready as far as the (absent) kubelet said: termination wins at once.
        pod = await blocking(admin.read_namespaced_pod, "p0", ns)
        assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)

        await blocking(kubelet.force_delete_pod, admin, ns, "p0")
        await wait_for(lambda: table.endpoint(rid(ns, "p0")) is None, what="p0 removed")
        assert sink.source_state(rid(ns, "p1")) is ReplicaState.READY  # the neighbour is untouched


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_readiness_ip_and_phase_transitions(control_plane, k8s_namespace, admin):
    ns = k8s_namespace
    p0, p1 = rid(ns, "p0"), rid(ns, "p1")
    async with running_source(discovery(ns, control_plane.admin_kubeconfig_path)) as sink:
        table = sink.table
        await blocking(kubelet.create_pod, admin, ns, "p0", VLLM, ip="10.1.0.5", ready=True)
        await blocking(kubelet.create_pod, admin, ns, "p1", VLLM, ip="10.1.0.6", ready=True)
        await wait_for(lambda: sink.source_state(p0) is ReplicaState.READY, what="p0 READY")

        await blocking(kubelet.set_pod_status, admin, ns, "p0", ready=False, pod_ip="10.1.0.5")
        await wait_for(lambda: sink.source_state(p0) is ReplicaState.PENDING, what="p0 PENDING (not Ready)")
        assert table.endpoint(p0).reason == "pod is not Ready"

        await blocking(kubelet.set_pod_status, admin, ns, "p0", ready=True, pod_ip="10.1.0.5")
        await wait_for(lambda: sink.source_state(p0) is ReplicaState.READY, what="p0 READY again")

        await blocking(kubelet.set_pod_status, admin, ns, "p0", ready=True, pod_ip=None)
        await wait_for(lambda: sink.source_state(p0) is ReplicaState.PENDING, what="p0 PENDING (no IP)")
        assert table.endpoint(p0).url == ""
        assert table.endpoint(p0).reason == "pod has no IP"

        await blocking(kubelet.set_pod_status, admin, ns, "p0", phase="Failed", ready=False, pod_ip="10.1.0.5")
        await wait_for(lambda: table.endpoint(p0) is None, what="failed p0 removed")
        pod = await blocking(admin.read_namespaced_pod, "p0", ns)
        assert pod.status.phase == "Failed"  # still in the API, gone from the table

        await blocking(kubelet.set_pod_status, admin, ns, "p1", phase="Succeeded", ready=False, pod_ip="10.1.0.6")
        await wait_for(lambda: table.endpoint(p1) is None, what="succeeded p1 removed")

    # A fresh source lists the finished pods and must not bring them back.
    async with running_source(discovery(ns, control_plane.admin_kubeconfig_path)) as sink:
        assert sink.table.replica_ids() == []


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_label_selector_filters_pods(control_plane, k8s_namespace, admin):
    ns = k8s_namespace
    # Non-matching pods before the source starts (the list) ...
    await blocking(kubelet.create_pod, admin, ns, "other-listed", {"app": "other"}, ip="10.1.0.1", ready=True)
    await blocking(kubelet.create_pod, admin, ns, "bare-listed", None, ip="10.1.0.2", ready=True)
    async with running_source(discovery(ns, control_plane.admin_kubeconfig_path)) as sink:
        table = sink.table
        # ... and while it watches, followed by a matching pod: events arrive in order on
        # one watch, so once the last one is in, the others would have been too.
        await blocking(kubelet.create_pod, admin, ns, "other-watched", {"app": "other"}, ip="10.1.0.3", ready=True)
        await blocking(kubelet.create_pod, admin, ns, "vllm", VLLM, ip="10.1.0.4", ready=True)
        await wait_for(lambda: sink.source_state(rid(ns, "vllm")) is ReplicaState.READY, what="the matching pod")
        assert table.replica_ids() == [rid(ns, "vllm")]
        for name in ("other-listed", "bare-listed", "other-watched"):
            assert not sink.mentioned(rid(ns, name)), name

        # Relabelled out of the selector: the watch says DELETED, the row goes.
        await blocking(admin.patch_namespaced_pod, "vllm", ns, {"metadata": {"labels": {"app": "other"}}})
        await wait_for(lambda: table.endpoint(rid(ns, "vllm")) is None, what="relabelled pod removed")
        # Relabelled into it: it appears.
        await blocking(admin.patch_namespaced_pod, "other-watched", ns, {"metadata": {"labels": {"app": "vllm"}}})
        await wait_for(
            lambda: sink.source_state(rid(ns, "other-watched")) is ReplicaState.READY, what="relabelled pod added"
        )
        assert table.replica_ids() == [rid(ns, "other-watched")]


# ----------------------------------------------------------------------------- outages


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_watch_outage_keeps_view_marks_stale_and_relist_drops_pod_deleted_meanwhile(
    control_plane, k8s_namespace, admin, tmp_path
):
    ns = k8s_namespace
    await blocking(kubelet.create_pod, admin, ns, "doomed", VLLM, ip="10.1.0.1", ready=True)
    await blocking(kubelet.create_pod, admin, ns, "stays", VLLM, ip="10.1.0.2", ready=True)
    proxy = CuttableProxy(control_plane.port)
    await proxy.start()
    try:
        kubeconfig = kubeconfig_via(control_plane, proxy.port, tmp_path / "via-proxy.kubeconfig")
        async with running_source(discovery(ns, kubeconfig)) as sink:
            table = sink.table
            doomed, stays, born = rid(ns, "doomed"), rid(ns, "stays"), rid(ns, "born")
            await wait_for(
                lambda: sink.source_state(doomed) is ReplicaState.READY and sink.source_state(stays) is ReplicaState.READY,
                what="both pods READY",
            )
            assert table.discovery.stale_since is None
            lists_before = sink.count("replace_all")

            proxy.cut()
            await wait_for(lambda: table.discovery.stale_since is not None, what="the source to report the outage")
            assert "unreachable" in table.discovery.message
            # The last view is kept: no mass removal while blind.
            assert {sink.source_state(doomed), sink.source_state(stays)} == {ReplicaState.READY}

            # The API server is fine; only our source cannot see it.
            await blocking(kubelet.force_delete_pod, admin, ns, "doomed")
            await blocking(kubelet.create_pod, admin, ns, "born", VLLM, ip="10.1.0.3", ready=True)
            assert table.endpoint(doomed) is not None  # nobody could have told the source yet

            proxy.restore()
            await wait_for(lambda: table.endpoint(doomed) is None, what="the pod deleted during the outage to go")
            await wait_for(lambda: sink.source_state(born) is ReplicaState.READY, what="the pod created during the outage")
            await wait_for(lambda: table.discovery.stale_since is None, what="stale_since to clear")
            assert sink.source_state(stays) is ReplicaState.READY
            assert sink.count("replace_all") > lists_before  # recovered by re-listing
    finally:
        await proxy.close()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_source_that_never_listed_is_not_synced_until_a_list_succeeds(
    control_plane, k8s_namespace, admin, tmp_path
):
    """A source started while the API server is unreachable (a health actor restarted during an
    outage) has seen nothing: it reports the failure, but never `synced`, and publishes no
    (empty) listing, so nobody can mistake its empty table for "no pods"."""
    ns = k8s_namespace
    await blocking(kubelet.create_pod, admin, ns, "p0", VLLM, ip="10.1.0.1", ready=True)
    proxy = CuttableProxy(control_plane.port)
    await proxy.start()
    proxy.cut()
    try:
        kubeconfig = kubeconfig_via(control_plane, proxy.port, tmp_path / "via-proxy.kubeconfig")
        async with running_source(discovery(ns, kubeconfig), wait_synced=False) as sink:
            table = sink.table
            await wait_for(lambda: table.discovery.stale_since is not None, what="the source to report the outage")
            # Several failed attempts, and still: not synced, nothing listed.
            await wait_for(lambda: proxy.accepted >= 3, what="three failed attempts")
            assert "unreachable" in table.discovery.message
            assert not table.discovery.synced, f"synced without a successful list: {table.discovery}"
            assert sink.count("replace_all") == 0 and table.replica_ids() == []

            proxy.restore()
            await wait_for(lambda: table.discovery.synced, what="synced after the first successful list")
            assert sink.source_state(rid(ns, "p0")) is ReplicaState.READY
            assert table.discovery.stale_since is None

            # Once it has listed, an outage keeps the view and says it is stale: still synced.
            proxy.cut()
            await wait_for(lambda: table.discovery.stale_since is not None, what="the second outage")
            assert table.discovery.synced and sink.source_state(rid(ns, "p0")) is ReplicaState.READY
    finally:
        await proxy.close()


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_apiserver_restart_then_changes_are_seen(control_plane, k8s_namespace, admin):
    ns = k8s_namespace
    old, new = rid(ns, "old"), rid(ns, "new")
    await blocking(kubelet.create_pod, admin, ns, "old", VLLM, ip="10.1.0.1", ready=True)
    # A short server-side watch timeout lets the stopping apiserver finish our watch quickly.
    cfg = discovery(ns, control_plane.admin_kubeconfig_path, watch_timeout_s=10)
    try:
        async with running_source(cfg) as sink:
            table = sink.table
            await wait_for(lambda: sink.source_state(old) is ReplicaState.READY, what="old READY")

            await blocking(control_plane.stop_apiserver)
            await wait_for(lambda: table.discovery.stale_since is not None, what="stale_since while the apiserver is down")
            assert sink.source_state(old) is ReplicaState.READY  # kept, not removed

            await blocking(control_plane.start_apiserver)
            await wait_for(lambda: table.discovery.stale_since is None, timeout=60, what="the source to reconnect")

            await blocking(kubelet.create_pod, admin, ns, "new", VLLM, ip="10.1.0.2", ready=True)
            await blocking(kubelet.force_delete_pod, admin, ns, "old")
            await wait_for(lambda: sink.source_state(new) is ReplicaState.READY, what="a pod created after the restart")
            await wait_for(lambda: table.endpoint(old) is None, what="a pod deleted after the restart")
    finally:
        if not control_plane.apiserver_running:
            control_plane.start_apiserver()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_watch_from_compacted_resource_version_raises_watch_expired(control_plane, k8s_namespace, k8s_api_client):
    """The real apiserver's 410 (an ERROR event in a 200 watch stream) is recognised."""
    ns = k8s_namespace
    await blocking(kubelet.create_pod, k8s_api_client, ns, "p0", VLLM, ip="10.1.0.1", ready=True)
    await blocking(compact_etcd, control_plane)
    source = KubernetesSource(discovery(ns, control_plane.admin_kubeconfig_path))
    api = client.CoreV1Api(k8s_api_client)
    posted: list[Any] = []
    with pytest.raises(_WatchExpired):
        await blocking(source._watch, api, "1", 5, lambda fn, *args: posted.append((fn, args)), RecordingSink())
    assert posted == []


class GatedApiClient(client.ApiClient):
    """An ApiClient whose watch requests wait for a gate (the source thread blocks in it).

    Lets a test hold the source between two watches, as a slow reconnect would, and see
    the resourceVersion it is about to resume from.
    """

    def __init__(self, configuration: client.Configuration) -> None:
        super().__init__(configuration)
        self.gate = threading.Event()
        self.gate.set()
        self.held_versions: list[str] = []

    def call_api(self, method, url, *args, **kwargs):  # type: ignore[override]
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        if query.get("watch") == "true" and not self.gate.is_set():
            self.held_versions.append(query.get("resourceVersion", ""))
            self.gate.wait()
        return super().call_api(method, url, *args, **kwargs)


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_watch_resumed_after_history_is_gone_gets_410_and_relists(
    control_plane, k8s_namespace, admin, caplog
):
    """410 Gone through the real loop: the source resumes a watch from a resourceVersion the
    apiserver no longer has (apiserver restarted, etcd compacted), must list again, and a pod
    deleted while it was not watching must go."""
    ns = k8s_namespace
    doomed, stays, born = rid(ns, "doomed"), rid(ns, "stays"), rid(ns, "born")
    caplog.set_level(logging.INFO, logger=kubernetes_discovery.__name__)
    await blocking(kubelet.create_pod, admin, ns, "doomed", VLLM, ip="10.1.0.1", ready=True)
    await blocking(kubelet.create_pod, admin, ns, "stays", VLLM, ip="10.1.0.2", ready=True)
    gated: list[GatedApiClient] = []

    def factory() -> GatedApiClient:
        configuration = client.Configuration()
        kube_config.load_kube_config(config_file=str(control_plane.admin_kubeconfig_path), client_configuration=configuration)
        gated.append(GatedApiClient(configuration))
        return gated[-1]

    # A large resync period, so the source resumes watches rather than re-listing; a short
    # server-side watch timeout, so a watch ends cleanly (and is resumed) within 10 s.
    cfg = discovery(ns, control_plane.admin_kubeconfig_path, resync_period_s=3600, watch_timeout_s=10)
    try:
        async with running_source(cfg, api_client_factory=factory) as sink:
            table = sink.table
            await wait_for(
                lambda: sink.source_state(doomed) is ReplicaState.READY and sink.source_state(stays) is ReplicaState.READY,
                what="both pods READY",
            )
            (api_client,) = gated
            api_client.gate.clear()
            # The current watch times out on the server and the source comes back to resume it.
            await wait_for(lambda: api_client.held_versions, what="the source to resume its watch")
            resume_from = api_client.held_versions[0]
            assert resume_from, "the source resumes from a resourceVersion"
            statuses_before = sink.count("status")

            # While it is away: a pod goes, the apiserver restarts (its watch cache starts
            # after `resume_from`), a pod comes, and etcd forgets the history.
            await blocking(kubelet.force_delete_pod, admin, ns, "doomed")
            await blocking(control_plane.restart_apiserver)
            await blocking(kubelet.create_pod, admin, ns, "born", VLLM, ip="10.1.0.3", ready=True)
            await blocking(compact_etcd, control_plane)

            # Precondition, checked with our own watch: the apiserver now answers 410.
            async def answers_410() -> bool:
                event = await blocking(first_watch_event, admin.api_client, ns, resume_from)
                return bool(event) and event["type"] == "ERROR" and event["object"].get("code") == 410

            deadline = time.monotonic() + 30
            while not await answers_410():
                assert time.monotonic() < deadline, f"apiserver does not answer 410 to a watch from {resume_from}"
                await asyncio.sleep(0.2)

            api_client.gate.set()
            await wait_for(lambda: table.endpoint(doomed) is None, what="the pod deleted meanwhile to go")
            await wait_for(lambda: sink.source_state(born) is ReplicaState.READY, what="the pod created meanwhile")
            assert sink.source_state(stays) is ReplicaState.READY
            assert any("410" in record.getMessage() for record in caplog.records), "the 410 path was not taken"
            # A 410 is routine: the source re-lists at once, without calling itself stale.
            assert all(
                status.stale_since is None for call, status in sink.calls[statuses_before:] if call == "status"
            )
    finally:
        for api_client in gated:
            api_client.gate.set()
        if not control_plane.apiserver_running:
            control_plane.start_apiserver()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_watch_denied_by_rbac_serves_the_list_says_why_and_backs_off(control_plane, k8s_namespace, admin, caplog):
    """A service account that may list pods but not watch them (an easy RBAC slip): the
    source serves what it listed, reports itself stale with the 403, and backs off
    rather than re-listing every 0.2 s for ever."""
    ns = k8s_namespace
    rbac = client.RbacAuthorizationV1Api(admin.api_client)
    role = {"metadata": {"name": "list-pods"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}
    binding = {
        "metadata": {"name": "gateway-list-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "list-pods"},
        "subjects": [{"kind": "ServiceAccount", "name": "gateway", "namespace": ns}],
    }
    await blocking(rbac.create_namespaced_role, ns, role)
    await blocking(rbac.create_namespaced_role_binding, ns, binding)
    token = await blocking(control_plane.service_account_token, ns, "gateway")
    kubeconfig = await blocking(control_plane.kubeconfig_for_token, token)
    await blocking(kubelet.create_pod, admin, ns, "p0", VLLM, ip="10.1.0.1", ready=True)
    caplog.set_level(logging.WARNING, logger=kubernetes_discovery.__name__)

    def retry_delays() -> list[float]:
        return [
            float(match.group(1))
            for record in caplog.records
            if (match := re.search(r"retrying in ([0-9.]+)s", record.getMessage()))
        ]

    async with running_source(discovery(ns, kubeconfig)) as sink:
        assert sink.source_state(rid(ns, "p0")) is ReplicaState.READY  # the list is allowed
        await wait_for(
            lambda: sink.table.discovery.stale_since is not None and "403" in sink.table.discovery.message,
            what="a stale status naming the 403",
        )
        await wait_for(lambda: len(retry_delays()) >= 5, timeout=60, what="five failed watches")
        delays = retry_delays()
        assert delays[4] >= 8 * delays[0], f"no backoff between failed watches: {delays}"
        assert sink.source_state(rid(ns, "p0")) is ReplicaState.READY  # kept throughout


# ----------------------------------------------------------------------------- credentials


@pytest.fixture
def no_credentials(monkeypatch, tmp_path) -> Any:
    """An environment outside any cluster, with no kubeconfig: HOME is an empty directory."""
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(kubernetes_discovery, "SERVICE_ACCOUNT_DIR", str(tmp_path / "no-service-account"), raising=False)
    return home


def test_no_credentials_at_all_fails_at_start_up_naming_discovery_kubeconfig(no_credentials, tmp_path):
    from serve_app.app import build_app
    from serve_app.config import ConfigError

    with pytest.raises(ConfigError, match="discovery.kubeconfig") as info:
        KubernetesSource(KubernetesDiscovery())
    assert "KUBECONFIG" in str(info.value) and "~/.kube/config" in str(info.value)
    # `serve run configs/app.yaml` builds the app first: it fails there, before any actor starts.
    with pytest.raises(ConfigError, match="discovery.kubeconfig"):
        build_app({"discovery": {"kind": "kubernetes", "namespace": "vllm"}})
    # A kubeconfig that is named but absent is the same mistake.
    with pytest.raises(ConfigError, match="discovery.kubeconfig.*no-such-file"):
        KubernetesSource(KubernetesDiscovery(kubeconfig=str(tmp_path / "no-such-file")))


def test_in_cluster_credentials_come_first_when_in_a_pod(no_credentials, monkeypatch, tmp_path):
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token")
    monkeypatch.setattr(kubernetes_discovery, "SERVICE_ACCOUNT_DIR", str(account))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (no_credentials / ".kube").mkdir()
    (no_credentials / ".kube" / "config").write_text("{}")
    assert kubernetes_discovery.resolve_credentials(KubernetesDiscovery()).kubeconfig is None  # in-cluster
    explicit = tmp_path / "explicit.kubeconfig"
    explicit.write_text("{}")
    assert kubernetes_discovery.resolve_credentials(KubernetesDiscovery(kubeconfig=str(explicit))).kubeconfig == str(explicit)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["KUBECONFIG", "~/.kube/config"])
async def test_outside_a_cluster_the_kubeconfig_of_kubectl_is_used(
    where, no_credentials, monkeypatch, control_plane, k8s_namespace, admin
):
    """As kubectl and kopf do: with discovery.kubeconfig null and no in-cluster service account,
    `$KUBECONFIG`, else `~/.kube/config`."""
    ns = k8s_namespace
    await blocking(kubelet.create_pod, admin, ns, "p0", VLLM, ip="10.1.0.1", ready=True)
    if where == "KUBECONFIG":
        monkeypatch.setenv("KUBECONFIG", str(control_plane.admin_kubeconfig_path))
    else:
        (no_credentials / ".kube").mkdir()
        (no_credentials / ".kube" / "config").write_text(control_plane.admin_kubeconfig_path.read_text())
    async with running_source(KubernetesDiscovery(namespace=ns)) as sink:
        await wait_for(lambda: sink.source_state(rid(ns, "p0")) is ReplicaState.READY, what="the pod, listed")
        assert sink.table.discovery.stale_since is None, sink.table.discovery


# ----------------------------------------------------------------------------- scope and scale


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_all_namespaces_mode_sees_pods_in_two_namespaces(
    control_plane, k8s_namespace, extra_namespace, admin
):
    ns1, ns2 = k8s_namespace, extra_namespace
    await blocking(kubelet.create_pod, admin, ns1, "p", VLLM, ip="10.1.0.1", ready=True)  # listed
    async with running_source(discovery(None, control_plane.admin_kubeconfig_path)) as sink:
        await wait_for(lambda: sink.source_state(rid(ns1, "p")) is ReplicaState.READY, what="pod in the first namespace")
        await blocking(kubelet.create_pod, admin, ns2, "p", VLLM, ip="10.1.0.2", ready=True)  # watched
        await wait_for(lambda: sink.source_state(rid(ns2, "p")) is ReplicaState.READY, what="pod in the second namespace")
        assert sink.table.endpoint(rid(ns1, "p")).url == "http://10.1.0.1:8000"
        assert sink.table.endpoint(rid(ns2, "p")).url == "http://10.1.0.2:8000"
        await blocking(kubelet.force_delete_pod, admin, ns2, "p")
        await wait_for(lambda: sink.table.endpoint(rid(ns2, "p")) is None, what="pod in the second namespace removed")
        assert sink.source_state(rid(ns1, "p")) is ReplicaState.READY


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_many_pods_listed_in_pages_and_watched(control_plane, k8s_namespace, admin, monkeypatch):
    ns = k8s_namespace
    monkeypatch.setattr(kubernetes_discovery, "LIST_PAGE_SIZE", 7)  # 50 pods: 8 pages
    limiter = asyncio.Semaphore(4)

    async def make(i: int) -> None:
        async with limiter:
            await blocking(kubelet.create_pod, admin, ns, f"p{i:02d}", VLLM, ip=f"10.2.0.{i + 1}", ready=True)

    await asyncio.gather(*(make(i) for i in range(50)))
    expected = {rid(ns, f"p{i:02d}") for i in range(50)}
    async with running_source(discovery(ns, control_plane.admin_kubeconfig_path)) as sink:
        table = sink.table
        # The first listing, in pages, already has all of them.
        first_list = next(arg for call, arg in sink.calls if call == "replace_all")
        assert {ep.replica_id for ep in first_list} == expected
        assert all(sink.source_state(r) is ReplicaState.READY for r in expected)
        assert table.endpoint(rid(ns, "p49")).url == "http://10.2.0.50:8000"

        # 50 more arrive through the watch.
        await asyncio.gather(*(make(i) for i in range(50, 100)))
        expected |= {rid(ns, f"p{i:02d}") for i in range(50, 100)}
        await wait_for(
            lambda: all(sink.source_state(r) is ReplicaState.READY for r in expected),
            timeout=60,
            what="100 pods READY",
        )
        assert set(table.replica_ids()) == expected


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_cancelling_run_stops_the_watch_thread(control_plane, k8s_namespace, k8s_api_client):
    before = set(threading.enumerate())
    source = KubernetesSource(discovery(k8s_namespace, control_plane.admin_kubeconfig_path))
    sink = RecordingSink()
    task = asyncio.create_task(source.run(sink))
    await wait_for(lambda: sink.table.discovery.synced, what="first listing")
    (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "pod-watch"]
    # Once the watch has delivered a pod, its thread is back in a blocking read of the stream.
    await blocking(kubelet.create_pod, k8s_api_client, k8s_namespace, "p0", VLLM)
    await wait_for(lambda: sink.table.endpoint(rid(k8s_namespace, "p0")), what="the pod through the watch")
    task.cancel()
    # Cancelling must neither block the event loop until the watch ends (minutes) nor
    # leave the thread behind.
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: not thread.is_alive(), timeout=15, what="the watch thread to end")
