"""The KubeRay manifests in kuberay/: consistent with configs/app.yaml, accepted by a
real kube-apiserver, and the RBAC they grant is exactly what the pod mirror needs."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from controlplane import kubelet
from serve_app.config import load_config
from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "kuberay"
APP_CONFIG = ROOT / "configs" / "app.yaml"
IMAGE = "rayproject/ray:2.60.0-py311"
SA_NAME = "llm-gateway"

pytestmark = pytest.mark.timeout(120)


def load_docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    assert docs, f"{name} holds no objects"
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def rayservice() -> dict[str, Any]:
    return one(load_docs("rayservice.yaml"), "RayService")


def serve_config() -> dict[str, Any]:
    raw = rayservice()["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 must be a YAML block string"
    return yaml.safe_load(raw)


def in_namespace(obj: dict[str, Any], ns: str) -> dict[str, Any]:
    """A copy of *obj* moved from the hard-coded `vllm` namespace into *ns*."""
    obj = copy.deepcopy(obj)
    if obj["kind"] == "Namespace":
        return obj
    obj["metadata"]["namespace"] = ns
    for subject in obj.get("subjects", []):
        if subject.get("kind") == "ServiceAccount":
            subject["namespace"] = ns
    return obj


def forbidden(call) -> ApiException:
    with pytest.raises(ApiException) as err:
        call()
    assert err.value.status == 403, f"expected 403, got {err.value.status}: {err.value.body}"
    return err.value


# ------------------------------------------------------------ the Serve config


def test_serve_config_v2_is_configs_app_yaml() -> None:
    assert serve_config() == yaml.safe_load(APP_CONFIG.read_text())


def test_serve_config_v2_validates_with_ray_and_gateway_schemas() -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config()
    schema = ServeDeploySchema.model_validate(cfg)
    assert [app.name for app in schema.applications] == ["llm-gateway"]
    app = schema.applications[0]
    assert app.route_prefix == "/"
    assert schema.http_options.port == 8000

    gateway = load_config(app.args)
    assert gateway.discovery.kind == "kubernetes"

    # The import path resolves to a real builder in this project.
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))

    # The Deployment manifest matches what discovery looks for.
    deployment = one(load_docs("vllm-deployment.yaml"), "Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["metadata"]["namespace"] == gateway.discovery.namespace
    selector = dict(part.split("=", 1) for part in gateway.discovery.label_selector.split(","))
    assert selector.items() <= pod["metadata"]["labels"].items()
    model = pod["metadata"]["labels"][gateway.discovery.model_label]
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--served-model-name") + 1] == model
    assert args[args.index("--port") + 1] == str(gateway.discovery.port)
    # RBAC is namespaced to where discovery looks.
    for obj in load_docs("rbac.yaml"):
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == gateway.discovery.namespace


# ------------------------------------------------------------- manifest shape


def test_rayservice_structure() -> None:
    """The RayService CRD is not installed in the test apiserver (no KubeRay
    operator), so it cannot be dry-run there; check its structure instead."""
    rs = rayservice()
    assert rs["apiVersion"] == "ray.io/v1"
    assert rs["kind"] == "RayService"
    assert rs["metadata"]["name"] and rs["metadata"]["namespace"] == "vllm"
    cluster = rs["spec"]["rayClusterConfig"]
    pod_specs = [cluster["headGroupSpec"]["template"]["spec"]]
    assert "rayStartParams" in cluster["headGroupSpec"]
    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod_specs.append(group["template"]["spec"])
    for spec in pod_specs:
        assert spec["serviceAccountName"] == SA_NAME
        assert [c["image"] for c in spec["containers"]] == [IMAGE]
    assert str(cluster["rayVersion"]) == IMAGE.split(":")[1].split("-")[0]
    head_ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 8000} <= head_ports


def test_every_ray_container_starts_serve_in_the_shipped_ingress_mode() -> None:
    """Ray reads the ingress mode from its environment at start: every Ray container gets
    what `python -m serve_app` sets (HAProxy on :8000), or that node's port 8000 is the slow proxy."""
    from serve_app.launch import SHIPPED_MODE, ingress_environment, serve_ingress_mode

    cluster = rayservice()["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    for spec in specs:
        for container in spec["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert ingress_environment(SHIPPED_MODE).items() <= env.items(), f"{container['name']}: {env}"
            assert serve_ingress_mode(env) == SHIPPED_MODE == "haproxy"


def test_vllm_deployment_terminates_gracefully() -> None:
    pod = one(load_docs("vllm-deployment.yaml"), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("vllm/vllm-openai")
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container[probe]["httpGet"]["port"] == 8000, probe
    cmd = container["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop_s = int(cmd[1])
    assert pre_stop_s >= 5
    args = container["args"]
    shutdown_s = int(args[args.index("--shutdown-timeout") + 1])
    assert shutdown_s > 0, "--shutdown-timeout 0 aborts in-flight requests"
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + shutdown_s


def test_role_is_least_privilege() -> None:
    role = one(load_docs("rbac.yaml"), "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert not [d for d in load_docs("rbac.yaml") if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


# ---------------------------------------------------- against the apiserver


def test_manifests_server_side_dry_run(k8s_api_client, k8s_namespace) -> None:
    """Every object of a kind the test apiserver knows is sent with dryRun=All and
    fieldValidation=Strict (so typos and unknown fields fail).  Namespaced objects
    go to a fresh namespace (a dry-run create needs the namespace to exist); the
    RayService (CRD unknown here) is covered by test_rayservice_structure."""
    dyn = DynamicClient(k8s_api_client)
    known = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment"}
    checked = []
    for name in ("rbac.yaml", "vllm-deployment.yaml", "rayservice.yaml"):
        for obj in load_docs(name):
            if obj["kind"] not in known:
                assert obj["kind"] == "RayService", f"unexpected kind {obj['kind']} in {name}"
                continue
            resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            body = in_namespace(obj, k8s_namespace)
            out = resource.create(
                body=body,
                namespace=body["metadata"].get("namespace"),
                query_params=[("dryRun", "All"), ("fieldValidation", "Strict")],
            )
            assert out.metadata.name == obj["metadata"]["name"]
            checked.append(obj["kind"])
    assert sorted(checked) == sorted(known)
    # Dry-run persisted nothing.
    assert client.AppsV1Api(k8s_api_client).list_namespaced_deployment(k8s_namespace).items == []


def test_rbac_grants_exactly_the_pod_mirror(control_plane, k8s_api_client, k8s_namespace) -> None:
    ns = k8s_namespace
    core = client.CoreV1Api(k8s_api_client)
    dyn = DynamicClient(k8s_api_client)
    other_ns = ns + "-other"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other_ns)))
    try:
        for obj in load_docs("rbac.yaml"):
            if obj["kind"] == "Namespace":
                continue
            body = in_namespace(obj, ns)
            dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).create(body=body, namespace=ns)
        kubelet.create_pod(core, ns, "vllm-0", {"app": "vllm", "llm-gateway/model": "m"}, ip="10.1.0.1", ready=True)
        kubelet.create_pod(core, other_ns, "elsewhere", {"app": "vllm"})

        sa = client.CoreV1Api(control_plane.service_account_client(ns, SA_NAME))

        def listed():
            try:
                return sa.list_namespaced_pod(ns, label_selector="app=vllm").items
            except ApiException as exc:
                if exc.status == 403:  # RBAC authorizer cache not updated yet
                    return None
                raise

        pods = wait_until(listed, 30, "the ServiceAccount to be allowed to list pods")
        assert [p.metadata.name for p in pods] == ["vllm-0"]
        assert sa.read_namespaced_pod("vllm-0", ns).metadata.name == "vllm-0"

        events = list(
            watch.Watch().stream(sa.list_namespaced_pod, ns, label_selector="app=vllm", timeout_seconds=1)
        )
        assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "vllm-0")]

        forbidden(lambda: sa.list_namespaced_secret(ns))
        forbidden(lambda: sa.list_namespaced_pod(other_ns))
        forbidden(lambda: sa.list_pod_for_all_namespaces())
        forbidden(lambda: kubelet.create_pod(sa, ns, "nope", {"app": "vllm"}))
        forbidden(lambda: sa.delete_namespaced_pod("vllm-0", ns))
    finally:
        try:
            core.delete_namespace(other_ns)
        except ApiException as exc:
            if exc.status != 404:
                raise

