"""Pod JSON -> Endpoint. Pure, so every lifecycle rule is unit-testable.

The rules (DESIGN.md): READY needs the Ready condition True, a pod IP, phase Running and
no deletionTimestamp; a deletionTimestamp means DRAINING at once, whatever else the pod
says; Succeeded/Failed pods are gone.
"""

from __future__ import annotations

from typing import Any

from ...config import KubernetesDiscovery
from ...replicas import Endpoint, ReplicaState

GONE_PHASES = frozenset({"Succeeded", "Failed"})


def pod_replica_id(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _is_ready(status: dict[str, Any]) -> bool:
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _port(meta: dict[str, Any], config: KubernetesDiscovery) -> int:
    for source in (meta.get("labels") or {}, meta.get("annotations") or {}):
        value = source.get(config.port_label)
        if value and str(value).isdigit() and 0 < int(value) <= 65535:
            return int(value)
    return config.port


def endpoint_from_pod(pod: dict[str, Any], config: KubernetesDiscovery) -> Endpoint | None:
    """The pod as the gateway sees it, or None when the pod is gone for good."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase in GONE_PHASES:
        return None
    ip = status.get("podIP") or ""
    url = ""
    if ip:
        host = f"[{ip}]" if ":" in ip else ip
        url = f"{config.scheme}://{host}:{_port(meta, config)}"
    if meta.get("deletionTimestamp"):
        state, reason = ReplicaState.DRAINING, "pod is terminating"
    elif not ip:
        state, reason = ReplicaState.PENDING, "pod has no IP"
    elif phase != "Running":
        state, reason = ReplicaState.PENDING, f"pod phase is {phase}"
    elif not _is_ready(status):
        state, reason = ReplicaState.PENDING, "pod is not Ready"
    else:
        state, reason = ReplicaState.READY, ""
    # Label first; an annotation of the same key also works, for names a label value can't
    # hold (e.g. "org/model").
    model = (meta.get("labels") or {}).get(config.model_label) or (meta.get("annotations") or {}).get(
        config.model_label
    )
    return Endpoint(
        replica_id=pod_replica_id(pod),
        url=url,
        models=(model,) if model else (),
        state=state,
        reason=reason,
        source=f"pod {pod_replica_id(pod)}",
    )
