"""pytest fixtures for the test control plane.

Load with ``pytest_plugins = ["controlplane.pytest_plugin"]`` in the top
conftest.py (or ``-p controlplane.pytest_plugin``).

Fixtures:

* ``control_plane`` (session): a started :class:`controlplane.ControlPlane`.
  Binaries come from ``$KUBEBUILDER_ASSETS`` or the build cache; when missing
  and Go is installed, ``controlplane/build.sh`` builds them right after
  collection (only if a collected test uses the fixture), outside any test
  timeout; a cold build takes minutes.  Without binaries and without Go the
  tests are skipped, except when ``CI=true``, where they fail.
* ``k8s_api_client`` (session): admin ``kubernetes.client.ApiClient``.
* ``k8s_namespace`` (function): name of a fresh namespace, deleted afterwards
  (it then stays ``Terminating``: there is no namespace controller).
"""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest

from .binaries import BinariesUnavailable, ensure_binaries, find_binaries, find_go
from .server import ControlPlane

_MISSING = (
    "no kube-apiserver/etcd for the test control plane: set KUBEBUILDER_ASSETS "
    "to a dir with kube-apiserver and etcd, or install Go so controlplane/build.sh "
    "can build them"
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _unavailable(msg: str) -> None:
    if _in_ci():
        pytest.fail(msg + " (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(msg)


_build_error: str | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build missing binaries before any test runs (so no timeout covers it)."""
    global _build_error
    if not any("control_plane" in getattr(it, "fixturenames", ()) for it in session.items):
        return
    if find_binaries() is not None or find_go() is None:
        return
    config = session.config
    capman = config.pluginmanager.getplugin("capturemanager")
    tr = config.pluginmanager.getplugin("terminalreporter")
    if tr is not None:
        tr.write_line(
            "controlplane: building kube-apiserver and etcd (controlplane/build.sh); "
            "a cold build takes several minutes"
        )
    try:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                ensure_binaries()
        else:
            ensure_binaries()
    except Exception as exc:  # reported by the fixture, per test
        _build_error = f"controlplane/build.sh failed: {exc}"


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    if _build_error is not None:
        pytest.fail(_build_error, pytrace=False)
    bins = find_binaries()
    if bins is None:
        if find_go() is None:
            _unavailable(_MISSING)
        try:
            bins = ensure_binaries()
        except BinariesUnavailable as exc:
            _unavailable(f"{_MISSING} ({exc})")
    cp = ControlPlane(bins)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def k8s_api_client(control_plane: ControlPlane):
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def k8s_namespace(control_plane: ControlPlane, k8s_api_client) -> Iterator[str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = f"test-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(k8s_api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        if control_plane.apiserver_running:
            try:
                core.delete_namespace(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
