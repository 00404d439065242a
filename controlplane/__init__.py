"""A real Kubernetes control plane (kube-apiserver + etcd) for tests.

The envtest pattern: ``controlplane/build.sh`` builds ``kube-apiserver`` and
``etcd`` from Go modules into a cache outside the repo (or uses
``$KUBEBUILDER_ASSETS``); :class:`ControlPlane` runs them on loopback with
RBAC on.  ``controlplane.pytest_plugin`` provides the pytest fixtures and
``controlplane.kubelet`` plays the (absent) kubelet for pods.
"""

from .binaries import (
    BinariesUnavailable,
    cache_dir,
    ensure_binaries,
    find_binaries,
    find_go,
    pinned_versions,
)
from .server import ControlPlane, ControlPlaneError, free_port

__all__ = [
    "BinariesUnavailable",
    "ControlPlane",
    "ControlPlaneError",
    "cache_dir",
    "ensure_binaries",
    "find_binaries",
    "find_go",
    "free_port",
    "pinned_versions",
]
