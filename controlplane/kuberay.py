"""The real KubeRay operator for tests: binary + CRDs, and the operator as a process.

``controlplane/build-kuberay.sh`` builds ``kuberay-operator`` from the Go module
``github.com/ray-project/kuberay/ray-operator`` at a pinned release and copies the
CRD YAMLs of the same release next to it.  Resolution order (as in the script):

1. ``$KUBERAY_ASSETS`` when it holds ``kuberay-operator`` and ``crd/*.yaml``;
2. the cache dir ``<cache>/kuberay/ray-operator-<VERSION>/`` (``<cache>`` as in
   :func:`controlplane.binaries.cache_root`);
3. a build with Go (:func:`ensure_kuberay`; minutes on a new machine).

:class:`OperatorProcess` runs the operator against a test apiserver (kubeconfig
from :class:`controlplane.ControlPlane`), leader election off, one watched
namespace, and stops it by its own PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

from .binaries import BinariesUnavailable, cache_root, find_go
from .server import _log_tail, _pdeathsig_preexec, free_port

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-kuberay.sh"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")


def pinned_version() -> str:
    """KUBERAY_VERSION as pinned at the top of build-kuberay.sh (env override wins)."""
    m = re.search(r'^KUBERAY_VERSION="\$\{KUBERAY_VERSION:-([^}]+)\}"', BUILD_SCRIPT.read_text(), re.M)
    if not m:
        raise RuntimeError(f"cannot find KUBERAY_VERSION in {BUILD_SCRIPT}")
    return os.environ.get("KUBERAY_VERSION") or m.group(1)


def cache_dir() -> Path:
    return cache_root() / "kuberay" / f"ray-operator-{pinned_version()}"


def _complete(d: Path) -> bool:
    exe = d / "kuberay-operator"
    return exe.is_file() and os.access(exe, os.X_OK) and all((d / "crd" / c).is_file() for c in CRD_FILES)


def find_kuberay() -> Path | None:
    """Directory with ``kuberay-operator`` and ``crd/``, or None (builds nothing)."""
    assets = os.environ.get("KUBERAY_ASSETS")
    if assets and _complete(Path(assets)):
        return Path(assets)
    d = cache_dir()
    return d if _complete(d) else None


def ensure_kuberay() -> Path:
    """find_kuberay(), else run build-kuberay.sh (needs Go); returns the directory."""
    found = find_kuberay()
    if found is not None:
        return found
    if find_go() is None:
        raise BinariesUnavailable("no kuberay-operator in the cache and no Go toolchain to build it")
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    if not lines or not _complete(Path(lines[-1])):
        raise BinariesUnavailable(f"{BUILD_SCRIPT} did not produce the operator and CRDs (stdout: {out.stdout!r})")
    return Path(lines[-1])


class OperatorProcess:
    """``kuberay-operator`` against the apiserver of *kubeconfig*, watching *namespace*."""

    def __init__(self, assets: Path, kubeconfig: Path, namespace: str, log_path: Path):
        self.assets = Path(assets)
        self.kubeconfig = Path(kubeconfig)
        self.namespace = namespace
        self.log_path = Path(log_path)
        self.probe_port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [
            str(self.assets / "kuberay-operator"),
            "--enable-leader-election=false",
            f"--watch-namespace={self.namespace}",
            "--metrics-addr=0",  # controller-runtime: "0" = no metrics listener
            f"--health-probe-bind-address=127.0.0.1:{self.probe_port}",
            "--log-stdout-encoder=console",
        ]

    def start(self) -> None:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        env.pop("ENABLE_WEBHOOKS", None)  # no webhook server: nothing would call it
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_pdeathsig_preexec if threading.current_thread() is threading.main_thread() else None,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)  # by PID, never by name
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.popen = None

    def tail(self, n_bytes: int = 6000) -> str:
        return _log_tail(self.log_path, n_bytes)
