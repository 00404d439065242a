"""Play the kubelet (and scheduler) against the test control plane.

There is no scheduler and no kubelet, so pods are created already bound to a
(fictitious) node via ``spec.nodeName`` and their status is written here
through the ``pods/status`` subresource, as a kubelet would.

Behaviour of the real apiserver without a kubelet, relied upon below:

* a pod with ``spec.nodeName`` that is deleted with a grace period is *not*
  removed: it gets ``metadata.deletionTimestamp`` (+ ``deletionGracePeriodSeconds``)
  and stays listed, until something deletes it with grace period 0
  (:func:`force_delete_pod`, what the kubelet does once containers stopped);
* a pod *without* ``nodeName`` (unscheduled) is removed at once by a delete;
* no Node object is needed for ``nodeName`` to be accepted.

Every function takes either a ``kubernetes.client.CoreV1Api`` or a
``kubernetes.client.ApiClient`` as *api*.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Mapping

from kubernetes import client

DEFAULT_NODE_NAME = "envtest-node"
CONTAINER_NAME = "vllm"
DEFAULT_IMAGE = "vllm/vllm-openai:latest"


def _core(api: Any) -> client.CoreV1Api:
    if isinstance(api, client.CoreV1Api):
        return api
    if isinstance(api, client.ApiClient):
        return client.CoreV1Api(api)
    raise TypeError(f"expected CoreV1Api or ApiClient, got {type(api).__name__}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_pod(
    api: Any,
    namespace: str,
    name: str,
    labels: Mapping[str, str] | None = None,
    ip: str | None = None,
    ready: bool = False,
    port: int = 8000,
    annotations: Mapping[str, str] | None = None,
    *,
    node_name: str = DEFAULT_NODE_NAME,
    termination_grace_period_seconds: int = 30,
    image: str = DEFAULT_IMAGE,
) -> client.V1Pod:
    """Create a pod bound to *node_name* with one container exposing *port*.

    The apiserver always stores a new pod as ``Pending`` without IP.  When
    *ip* is given or *ready* is true, the status is then set as a kubelet
    would (``Running``, podIP, Ready condition) and the updated pod returned.
    """
    core = _core(api)
    pod = client.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=client.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels=dict(labels or {}),
            annotations=dict(annotations or {}) or None,
        ),
        spec=client.V1PodSpec(
            node_name=node_name,
            termination_grace_period_seconds=termination_grace_period_seconds,
            containers=[
                client.V1Container(
                    name=CONTAINER_NAME,
                    image=image,
                    ports=[
                        client.V1ContainerPort(
                            name="http", container_port=port, protocol="TCP"
                        )
                    ],
                )
            ],
        ),
    )
    created = core.create_namespaced_pod(namespace, pod)
    if ip is not None or ready:
        return set_pod_status(core, namespace, name, phase="Running", ready=ready, pod_ip=ip)
    return created


def pod_status_body(
    *,
    phase: str = "Running",
    ready: bool,
    pod_ip: str | None,
    container_name: str = CONTAINER_NAME,
    image: str = DEFAULT_IMAGE,
) -> dict[str, Any]:
    """The ``status`` a kubelet would report (as a JSON-able dict)."""
    now = _now()
    ready_s = "True" if ready else "False"
    running = phase == "Running"
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": ready_s, "lastTransitionTime": now},
        {"type": "Ready", "status": ready_s, "lastTransitionTime": now},
    ]
    if not ready:
        for c in conditions[2:]:
            c["reason"] = "ContainersNotReady"
            c["message"] = f"containers with unready status: [{container_name}]"
    if running:
        state: dict[str, Any] = {"running": {"startedAt": now}}
    elif phase in ("Succeeded", "Failed"):
        state = {
            "terminated": {
                "exitCode": 0 if phase == "Succeeded" else 1,
                "reason": "Completed" if phase == "Succeeded" else "Error",
                "startedAt": now,
                "finishedAt": now,
            }
        }
    else:
        state = {"waiting": {"reason": "ContainerCreating"}}
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "containerStatuses": [
            {
                "name": container_name,
                "image": image,
                "imageID": "",
                "ready": bool(ready and running),
                "started": running,
                "restartCount": 0,
                "state": state,
            }
        ],
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}] if pod_ip else None,
    }
    if running:
        status["startTime"] = now
    return status


def set_pod_status(
    api: Any,
    ns: str,
    name: str,
    *,
    phase: str = "Running",
    ready: bool,
    pod_ip: str | None,
) -> client.V1Pod:
    """Write the pod's status via the ``status`` subresource, as a kubelet.

    Sets phase, conditions (PodScheduled/Initialized/ContainersReady/Ready),
    the container status, podIP and podIPs (removed when *pod_ip* is None).
    Uses a JSON merge patch, so lists (conditions, podIPs) are replaced whole.
    """
    core = _core(api)
    body = {"status": pod_status_body(phase=phase, ready=ready, pod_ip=pod_ip)}
    return core.patch_namespaced_pod_status(
        name, ns, body, _content_type="application/merge-patch+json"
    )


def terminate_pod(api: Any, ns: str, name: str, grace_seconds: int = 30) -> client.V1Pod:
    """Delete with a grace period, as ``kubectl delete pod`` does.

    With no kubelet, the pod (which has a nodeName) stays: it gets
    ``metadata.deletionTimestamp`` and ``deletionGracePeriodSeconds`` (a
    MODIFIED watch event) and remains listed until :func:`force_delete_pod`.
    Returns the pod as the apiserver answered (deletionTimestamp set).
    (A pod without nodeName would be removed at once.)
    """
    core = _core(api)
    return core.delete_namespaced_pod(
        name,
        ns,
        grace_period_seconds=grace_seconds,
        body=client.V1DeleteOptions(grace_period_seconds=grace_seconds),
    )


def force_delete_pod(api: Any, ns: str, name: str) -> None:
    """Delete with grace period 0 (what a kubelet does at the end): gone at once.

    On a pod already terminating this yields a MODIFIED event (grace period
    cut to 0) and then DELETED.
    """
    core = _core(api)
    core.delete_namespaced_pod(
        name,
        ns,
        grace_period_seconds=0,
        body=client.V1DeleteOptions(grace_period_seconds=0),
    )
