"""kuberay/ against the real KubeRay operator and its real CRD schema.

The operator is built from its Go module at the release pinned in
controlplane/build-kuberay.sh, and its CRDs (same release) are installed in the
test apiserver.  kuberay/rbac.yaml and kuberay/rayservice.yaml are applied
unchanged, in namespace `vllm`, as a user would (`kubectl apply` sends
fieldValidation=Strict): first with dryRun=All, then for real.  The operator runs
as a process against the test apiserver (leader election off, watching `vllm`)
and must turn the RayService into a RayCluster and head and worker pods with our
image, ServiceAccount, environment and ray start parameters.

What this cannot show: there is no scheduler or kubelet, so the pods stay Pending
(no node, no containers), the Ray head never starts, and the operator never
reaches the dashboard to submit the Serve config.  The Serve config is checked as
the operator received it: the RayService it reconciles carries serveConfigV2
unchanged (import path `serve_app.app:build_app` and the args).
"""

from __future__ import annotations

import copy
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from controlplane.binaries import BinariesUnavailable, find_go
from controlplane.kuberay import CRD_FILES, OperatorProcess, ensure_kuberay, find_kuberay

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "kuberay"
NAMESPACE = "vllm"  # where kuberay/*.yaml put everything
SA_NAME = "llm-gateway"
# The CRDs are ~3 MB of YAML: libyaml parses them in seconds, pure Python in ~30 s.
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}

# The operator build (minutes, once) happens in a fixture, outside the timeout.
pytestmark = pytest.mark.timeout(240, func_only=True)


def load_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def rayservice_manifest() -> dict[str, Any]:
    [rs] = [d for d in load_docs("rayservice.yaml") if d["kind"] == "RayService"]
    return rs


def wait_for(predicate, timeout: float, what: str, operator: OperatorProcess | None = None, interval: float = 0.2):
    """Poll until *predicate* returns something truthy; fail early if the operator died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        if operator is not None and not operator.alive():
            pytest.fail(f"kuberay-operator exited while waiting for {what}; log:\n{operator.tail()}")
        try:
            value = predicate()
            if value:
                return value
        except ApiException as exc:
            last = exc
        if time.monotonic() > deadline:
            log = f"\noperator log:\n{operator.tail()}" if operator is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last!r}){log}")
        time.sleep(interval)


def is_subset(want: Any, got: Any, path: str = "") -> list[str]:
    """Paths where *got* lacks or differs from *want* (dicts compared key by key)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path or '.'}: {got!r} is not a mapping"]
        out: list[str] = []
        for k, v in want.items():
            if k not in got:
                out.append(f"{path}.{k}: missing (pruned?)")
            else:
                out += is_subset(v, got[k], f"{path}.{k}")
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: {got!r} != {want!r}"]
        return [p for i, (w, g) in enumerate(zip(want, got)) for p in is_subset(w, g, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: {got!r} != {want!r}"]


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kuberay_assets() -> Path:
    found = find_kuberay()
    if found is not None:
        return found
    if find_go() is None:
        msg = "no kuberay-operator (run controlplane/build-kuberay.sh or set KUBERAY_ASSETS) and no Go to build it"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(msg + " (CI=true)", pytrace=False)
        pytest.skip(msg)
    try:
        return ensure_kuberay()
    except (BinariesUnavailable, OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"controlplane/build-kuberay.sh failed: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def ray_crds(kuberay_assets: Path, k8s_api_client) -> list[str]:
    """The release's CRDs, created and Established (kept for the session)."""
    ext = client.ApiextensionsV1Api(k8s_api_client)
    names = []
    for f in CRD_FILES:
        crd = yaml.load((kuberay_assets / "crd" / f).read_text(), Loader=FAST_LOADER)
        names.append(crd["metadata"]["name"])
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:  # created earlier in this session
                raise

    def established() -> bool:
        for n in names:
            conds = ext.read_custom_resource_definition(n).status.conditions or []
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return False
        return True

    wait_for(established, 60, "the ray.io CRDs to be Established")
    return names


@pytest.fixture(scope="module")
def dyn(ray_crds, k8s_api_client) -> DynamicClient:
    """A DynamicClient whose discovery already lists ray.io/v1 (fresh, after the CRDs)."""

    def discovered() -> DynamicClient | None:
        d = DynamicClient(k8s_api_client)
        try:
            d.resources.get(api_version="ray.io/v1", kind="RayService")
        except Exception:  # noqa: BLE001 - not served yet: retry with a fresh discovery cache
            return None
        return d

    return wait_for(discovered, 60, "ray.io/v1 in API discovery")


def apply(dyn: DynamicClient, obj: dict[str, Any], *, dry_run: bool) -> Any:
    """Create *obj* as `kubectl apply` does for a new object: strict field validation."""
    resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    params = [("fieldValidation", "Strict")] + ([("dryRun", "All")] if dry_run else [])
    return resource.create(body=obj, namespace=obj["metadata"].get("namespace"), query_params=params)


@pytest.fixture(scope="module")
def applied(dyn: DynamicClient) -> dict[str, Any]:
    """kuberay/rbac.yaml then kuberay/rayservice.yaml, dry run first, then created."""
    docs = load_docs("rbac.yaml") + load_docs("rayservice.yaml")
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Namespace", "ServiceAccount", "Role", "RoleBinding", "RayService"], kinds
    # Namespace first (the dry run of namespaced objects needs it to exist).
    apply(dyn, docs[0], dry_run=True)
    apply(dyn, docs[0], dry_run=False)
    for obj in docs[1:]:
        out = apply(dyn, obj, dry_run=True)
        assert out.metadata.name == obj["metadata"]["name"]
    rs_resource = dyn.resources.get(api_version="ray.io/v1", kind="RayService")
    assert rs_resource.get(namespace=NAMESPACE).items == [], "the dry run persisted a RayService"
    for obj in docs[1:]:
        apply(dyn, obj, dry_run=False)
    return rs_resource.get(name="llm-gateway", namespace=NAMESPACE).to_dict()


@pytest.fixture(scope="module")
def operator(applied, control_plane, kuberay_assets: Path, tmp_path_factory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("kuberay-operator") / "operator.log"
    op = OperatorProcess(kuberay_assets, control_plane.admin_kubeconfig_path, NAMESPACE, log)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture(scope="module")
def ray_cluster(operator: OperatorProcess, dyn: DynamicClient) -> dict[str, Any]:
    rc = dyn.resources.get(api_version="ray.io/v1", kind="RayCluster")
    items = wait_for(lambda: rc.get(namespace=NAMESPACE).items, 120, "the operator to create a RayCluster", operator)
    assert len(items) == 1, [i.metadata.name for i in items]
    return items[0].to_dict()


def pods(k8s_api_client, cluster: str, node_type: str) -> list[client.V1Pod]:
    return client.CoreV1Api(k8s_api_client).list_namespaced_pod(
        NAMESPACE, label_selector=f"ray.io/cluster={cluster},ray.io/node-type={node_type}"
    ).items


def env_of(container: client.V1Container) -> dict[str, str | None]:
    return {e.name: e.value for e in container.env or []}


def start_command(container: client.V1Container) -> str:
    return " ".join((container.command or []) + (container.args or []))


# ----------------------------------------------------------- schema only


def test_manifests_pass_the_real_crd_schema_unchanged(applied: dict[str, Any]) -> None:
    """Strict validation accepted every field, and nothing was pruned or rewritten."""
    manifest = rayservice_manifest()
    problems = is_subset(manifest["spec"], applied["spec"], "spec")
    assert not problems, "the stored RayService differs from kuberay/rayservice.yaml:\n" + "\n".join(problems)


def test_real_crd_schema_rejects_what_it_should(dyn: DynamicClient, applied) -> None:
    """The validation above has teeth: an unknown field and a wrong type are refused."""
    base = rayservice_manifest()
    base["metadata"]["name"] = "llm-gateway-bad"

    typo = copy.deepcopy(base)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    with pytest.raises(ApiException) as err:
        apply(dyn, typo, dry_run=True)
    assert err.value.status in (400, 422) and "rayStartParam" in err.value.body, err.value.body

    wrong_type = copy.deepcopy(base)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(ApiException) as err:
        apply(dyn, wrong_type, dry_run=True)
    assert err.value.status == 422 and "replicas" in err.value.body, err.value.body


# ----------------------------------------------------------- the operator


def test_operator_creates_the_ray_cluster_we_intend(ray_cluster: dict[str, Any], applied: dict[str, Any], operator) -> None:
    meta = ray_cluster["metadata"]
    assert meta["name"].startswith("llm-gateway-")
    [owner] = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("RayService", "llm-gateway", applied["metadata"]["uid"])
    assert owner.get("controller") is True
    # The RayCluster spec is the RayService's rayClusterConfig (the operator may add defaults).
    want = rayservice_manifest()["spec"]["rayClusterConfig"]
    problems = is_subset(want, ray_cluster["spec"], "spec")
    assert not problems, "RayCluster spec differs from rayClusterConfig:\n" + "\n".join(problems)


def test_operator_creates_the_head_pod_we_intend(ray_cluster, k8s_api_client, operator) -> None:
    name = ray_cluster["metadata"]["name"]
    [head] = wait_for(lambda: pods(k8s_api_client, name, "head"), 60, "the head pod", operator)
    assert head.spec.service_account_name == SA_NAME
    assert head.spec.node_name is None and head.status.phase == "Pending"  # no scheduler / kubelet here
    [ray] = [c for c in head.spec.containers if c.name == "ray-head"]
    manifest_head = rayservice_manifest()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert ray.image == manifest_head["image"]
    env = env_of(ray)
    for k, v in SERVE_ENV.items():
        assert env.get(k) == v, f"{k} on the head: {env.get(k)!r}"
    cmd = start_command(ray)
    assert "ray start --head" in cmd, cmd
    for param in ("--num-cpus=0", "--dashboard-host=0.0.0.0"):
        assert param in cmd, f"{param} not in the head's start command: {cmd}"
    ports = {p.name: p.container_port for p in ray.ports or []}
    assert ports.get("serve") == 8000 and ports.get("dashboard") == 8265, ports
    assert ray.resources.limits == manifest_head["resources"]["limits"]
    assert ray.resources.requests == manifest_head["resources"]["requests"]
    # Built by the RayService path: the head starts outside the Serve Service (label false)
    # until the operator sees its Serve proxy healthy, which needs a running head.
    assert head.metadata.labels.get("ray.io/serve") == "false", head.metadata.labels
    # The head Service the operator creates for it.
    svcs = wait_for(
        lambda: client.CoreV1Api(k8s_api_client).list_namespaced_service(
            NAMESPACE, label_selector=f"ray.io/cluster={name},ray.io/node-type=head"
        ).items,
        60,
        "the head Service",
        operator,
    )
    assert any(p.port == 8265 for s in svcs for p in s.spec.ports), [s.spec.ports for s in svcs]


def test_operator_creates_the_worker_pods_we_intend(ray_cluster, k8s_api_client, operator) -> None:
    name = ray_cluster["metadata"]["name"]
    group = rayservice_manifest()["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    workers = wait_for(
        lambda: (p := pods(k8s_api_client, name, "worker")) and len(p) >= group["replicas"] and p,
        60,
        f"{group['replicas']} worker pods",
        operator,
    )
    assert len(workers) == group["replicas"]
    for pod in workers:
        assert pod.metadata.labels.get("ray.io/group") == group["groupName"]
        assert pod.spec.service_account_name == SA_NAME
        [ray] = [c for c in pod.spec.containers if c.name == "ray-worker"]
        assert ray.image == group["template"]["spec"]["containers"][0]["image"]
        env = env_of(ray)
        for k, v in SERVE_ENV.items():
            assert env.get(k) == v, f"{k} on worker {pod.metadata.name}: {env.get(k)!r}"
        cmd = start_command(ray)
        assert "ray start" in cmd and "--head" not in cmd and f"--address={name}-head-svc." in cmd, cmd
        assert ray.resources.limits == group["template"]["spec"]["containers"][0]["resources"]["limits"]
        # Workers are in the Serve Service from the start (their readiness probe gates traffic).
        assert pod.metadata.labels.get("ray.io/serve") == "true", pod.metadata.labels


def test_operator_accepts_the_rayservice_and_holds_its_serve_config(ray_cluster, dyn: DynamicClient, operator) -> None:
    """Accepted: the operator put the new cluster into the RayService status as pending
    (it would submit serveConfigV2 to it once the head is up, which needs a kubelet)."""
    rs = dyn.resources.get(api_version="ray.io/v1", kind="RayService")
    cluster = ray_cluster["metadata"]["name"]
    got = wait_for(
        lambda: (o := rs.get(name="llm-gateway", namespace=NAMESPACE).to_dict())
        .get("status", {}).get("pendingServiceStatus", {}).get("rayClusterName") == cluster and o,
        60,
        "the RayService status to name the pending RayCluster",
        operator,
    )
    conds = {c["type"]: c for c in got["status"].get("conditions", [])}
    assert conds.get("Ready", {}).get("status") == "False", conds
    assert conds["Ready"].get("reason") == "Initializing", conds
    # The Serve config the operator reconciles is ours, unchanged.
    stored = yaml.safe_load(got["spec"]["serveConfigV2"])
    assert stored == yaml.safe_load(rayservice_manifest()["spec"]["serveConfigV2"])
    [app] = stored["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    assert app["args"]["discovery"]["kind"] == "kubernetes"
    assert app["args"]["discovery"]["namespace"] == NAMESPACE
