"""Checks of the test control plane itself (controlplane/): a real
kube-apiserver + etcd with RBAC, plus the kubelet stand-in helpers."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from controlplane import ControlPlane, pinned_versions
from controlplane import kubelet
from controlplane import pytest_plugin

REPO = Path(__file__).resolve().parent.parent
BUILD_SH = REPO / "controlplane" / "build.sh"


def _core(cp: ControlPlane) -> client.CoreV1Api:
    return client.CoreV1Api(cp.api_client())


def _wait_for(predicate, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# --------------------------------------------------------------- no binaries


@pytest.mark.timeout(30)
def test_build_sh_uses_kubebuilder_assets_without_building(tmp_path):
    for name in ("kube-apiserver", "etcd"):
        f = tmp_path / name
        f.write_text("#!/bin/sh\nexit 0\n")
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, KUBEBUILDER_ASSETS=str(tmp_path), GO="/nonexistent/go")
    out = subprocess.run(
        ["bash", str(BUILD_SH)], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path)


@pytest.mark.timeout(30)
def test_missing_binaries_skip_or_fail_on_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        pytest_plugin._unavailable("nothing here")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        pytest_plugin._unavailable("nothing here")


# -------------------------------------------------------------- apiserver up


@pytest.mark.timeout(120)
def test_readyz_and_version_over_verified_tls(control_plane):
    # Verifies the serving cert against the CA extracted from --cert-dir.
    ctx = ssl.create_default_context(cafile=str(control_plane.ca_cert_path))
    req = urllib.request.Request(
        control_plane.host + "/readyz",
        headers={"Authorization": f"Bearer {control_plane.admin_token}"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        assert resp.status == 200
        assert resp.read().strip() == b"ok"

    info = client.VersionApi(control_plane.api_client()).get_code()
    assert info.major == "1"
    if not os.environ.get("KUBEBUILDER_ASSETS"):
        assert info.git_version == pinned_versions()[0]


@pytest.mark.timeout(60)
def test_admin_kubeconfig_file_works(control_plane):
    api = config.new_client_from_config(str(control_plane.admin_kubeconfig_path))
    names = {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items}
    assert {"default", "kube-system"} <= names


# --------------------------------------------------------------------- pods


@pytest.mark.timeout(60)
def test_pod_status_roundtrip(control_plane, k8s_namespace):
    core = _core(control_plane)
    pod = kubelet.create_pod(
        core,
        k8s_namespace,
        "vllm-0",
        labels={"app": "vllm", "model": "m1"},
        annotations={"llm-gateway/weight": "2"},
        port=8001,
    )
    assert pod.status.phase == "Pending"
    assert pod.status.pod_ip is None
    assert pod.spec.node_name == kubelet.DEFAULT_NODE_NAME

    kubelet.set_pod_status(core, k8s_namespace, "vllm-0", ready=True, pod_ip="10.1.2.3")
    got = core.read_namespaced_pod("vllm-0", k8s_namespace)
    assert got.status.phase == "Running"
    assert got.status.pod_ip == "10.1.2.3"
    assert [p.ip for p in got.status.pod_ips] == ["10.1.2.3"]
    conds = {c.type: c.status for c in got.status.conditions}
    assert conds["Ready"] == "True" and conds["ContainersReady"] == "True"
    assert got.metadata.labels == {"app": "vllm", "model": "m1"}
    assert got.metadata.annotations["llm-gateway/weight"] == "2"
    assert got.spec.containers[0].ports[0].container_port == 8001

    # Readiness flips back (e.g. a failing readiness probe).
    kubelet.set_pod_status(core, k8s_namespace, "vllm-0", ready=False, pod_ip="10.1.2.3")
    got = core.read_namespaced_pod("vllm-0", k8s_namespace)
    conds = {c.type: c.status for c in got.status.conditions}
    assert conds["Ready"] == "False"
    assert got.status.container_statuses[0].ready is False

    # create_pod with ip/ready sets the status right away.
    pod2 = kubelet.create_pod(core, k8s_namespace, "vllm-1", {"app": "vllm"}, ip="10.1.2.4", ready=True)
    assert pod2.status.pod_ip == "10.1.2.4"
    assert {c.type: c.status for c in pod2.status.conditions}["Ready"] == "True"


@pytest.mark.timeout(60)
def test_terminate_pod_leaves_deletion_timestamp(control_plane, k8s_namespace):
    core = _core(control_plane)
    kubelet.create_pod(core, k8s_namespace, "p", {"app": "vllm"}, ip="10.1.0.9", ready=True)

    answered = kubelet.terminate_pod(core, k8s_namespace, "p", grace_seconds=30)
    assert answered is not None and answered.metadata.deletion_timestamp is not None

    got = core.read_namespaced_pod("p", k8s_namespace)
    assert got.metadata.deletion_timestamp is not None
    assert got.metadata.deletion_grace_period_seconds == 30
    listed = core.list_namespaced_pod(k8s_namespace).items
    assert [p.metadata.name for p in listed] == ["p"]

    kubelet.force_delete_pod(core, k8s_namespace, "p")
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("p", k8s_namespace)
    assert err.value.status == 404


@pytest.mark.timeout(60)
def test_watch_from_list_resource_version(control_plane, k8s_namespace):
    core = _core(control_plane)
    kubelet.create_pod(core, k8s_namespace, "before", {"app": "vllm"})
    listing = core.list_namespaced_pod(k8s_namespace)
    assert [p.metadata.name for p in listing.items] == ["before"]
    rv = listing.metadata.resource_version

    # Changes after the list; the watch starts later, from the list's RV,
    # and must still see all of them, and nothing from before the list.
    kubelet.create_pod(core, k8s_namespace, "w", {"app": "vllm"})
    kubelet.set_pod_status(core, k8s_namespace, "w", ready=True, pod_ip="10.9.9.9")
    kubelet.terminate_pod(core, k8s_namespace, "w")
    kubelet.force_delete_pod(core, k8s_namespace, "w")

    events = []
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_pod, k8s_namespace, resource_version=rv, timeout_seconds=10):
        events.append((ev["type"], ev["object"].metadata.name, ev["object"]))
        if ev["type"] == "DELETED":
            w.stop()
    types = [(t, n) for t, n, _ in events]
    # Graceful delete (deletionTimestamp set) then grace 0: the second is a
    # further MODIFIED (deletionGracePeriodSeconds 30 -> 0) before DELETED.
    assert types == [
        ("ADDED", "w"),
        ("MODIFIED", "w"),  # status: Ready + podIP
        ("MODIFIED", "w"),  # terminate_pod: deletionTimestamp set
        ("MODIFIED", "w"),  # force_delete_pod: grace period cut to 0
        ("DELETED", "w"),
    ], types
    assert events[1][2].status.pod_ip == "10.9.9.9"
    assert events[1][2].metadata.deletion_timestamp is None
    assert events[2][2].metadata.deletion_timestamp is not None
    assert events[2][2].metadata.deletion_grace_period_seconds == 30
    assert events[3][2].metadata.deletion_grace_period_seconds == 0


# ------------------------------------------------------------------- outage


@pytest.mark.timeout(180)
def test_restart_apiserver_keeps_data_and_client_reconnects(control_plane, k8s_namespace):
    core = _core(control_plane)
    kubelet.create_pod(core, k8s_namespace, "survivor", {"app": "vllm"}, ip="10.2.0.1", ready=True)
    port = control_plane.port

    control_plane.stop_apiserver()
    assert not control_plane.apiserver_running
    outage_client = client.CoreV1Api(
        client.ApiClient(_no_retry_config(control_plane))
    )
    with pytest.raises(Exception):
        outage_client.list_namespaced_pod(k8s_namespace, _request_timeout=5)

    control_plane.start_apiserver()
    assert control_plane.port == port
    # Same ApiClient object as before the outage: it reconnects.
    got = core.read_namespaced_pod("survivor", k8s_namespace)
    assert got.status.pod_ip == "10.2.0.1"

    control_plane.restart_apiserver()
    assert control_plane.port == port
    names = [p.metadata.name for p in core.list_namespaced_pod(k8s_namespace).items]
    assert names == ["survivor"]


def _no_retry_config(cp: ControlPlane) -> client.Configuration:
    cfg = cp.configuration()
    cfg.retries = 0
    return cfg


# --------------------------------------------------------------------- RBAC


@pytest.mark.timeout(90)
def test_rbac_service_account(control_plane, k8s_namespace):
    admin = control_plane.api_client()
    core = client.CoreV1Api(admin)
    other_ns = k8s_namespace + "-other"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other_ns)))
    try:
        sa = client.CoreV1Api(control_plane.service_account_client(k8s_namespace, "gateway"))

        # Authenticated as the SA, but no Role bound: refused.
        with pytest.raises(ApiException) as err:
            sa.list_namespaced_pod(k8s_namespace)
        assert err.value.status == 403
        assert f"system:serviceaccount:{k8s_namespace}:gateway" in err.value.body

        rbac = client.RbacAuthorizationV1Api(admin)
        rbac.create_namespaced_role(
            k8s_namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="pod-reader"),
                rules=[
                    client.V1PolicyRule(
                        api_groups=[""], resources=["pods"], verbs=["get", "list", "watch"]
                    )
                ],
            ),
        )
        rbac.create_namespaced_role_binding(
            k8s_namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="gateway-pod-reader"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"
                ),
                subjects=[
                    client.RbacV1Subject(
                        kind="ServiceAccount", name="gateway", namespace=k8s_namespace
                    )
                ],
            ),
        )
        kubelet.create_pod(core, k8s_namespace, "visible", {"app": "vllm"})

        def can_list():
            try:
                return sa.list_namespaced_pod(k8s_namespace).items or None
            except ApiException as exc:
                if exc.status == 403:  # RBAC cache not updated yet
                    return None
                raise

        items = _wait_for(can_list)
        assert [p.metadata.name for p in items] == ["visible"]

        for forbidden in (
            lambda: sa.list_namespaced_secret(k8s_namespace),
            lambda: sa.list_namespaced_pod(other_ns),
            lambda: sa.list_pod_for_all_namespaces(),
            lambda: kubelet.create_pod(sa, k8s_namespace, "nope", {}),
        ):
            with pytest.raises(ApiException) as err:
                forbidden()
            assert err.value.status == 403

        # The same identity through a kubeconfig file (what the gateway loads).
        kc = control_plane.kubeconfig_for_token(
            control_plane.service_account_token(k8s_namespace, "gateway")
        )
        via_kc = client.CoreV1Api(config.new_client_from_config(str(kc)))
        assert [p.metadata.name for p in via_kc.list_namespaced_pod(k8s_namespace).items] == ["visible"]
    finally:
        core.delete_namespace(other_ns)
