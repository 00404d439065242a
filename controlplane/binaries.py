"""Locate (or build) the ``kube-apiserver`` and ``etcd`` binaries.

Resolution order, as in controller-runtime's envtest:

1. ``$KUBEBUILDER_ASSETS`` when it holds both binaries;
2. the build cache ``<cache>/envtest/k8s-<K8S>-etcd-<ETCD>/`` that
   ``controlplane/build.sh`` fills, where ``<cache>`` is
   ``$LLM_GATEWAY_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/llm-gateway``.

The pinned versions live in ``build.sh`` (single source of truth); they are
parsed from it here so the two never drift apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent / "build.sh"
BINARIES = ("kube-apiserver", "etcd")


class BinariesUnavailable(RuntimeError):
    """Neither prebuilt binaries nor a Go toolchain to build them are available."""


def pinned_versions() -> tuple[str, str]:
    """(K8S_VERSION, ETCD_VERSION) as pinned at the top of build.sh.

    Environment overrides ``K8S_VERSION`` / ``ETCD_VERSION`` win, as in build.sh.
    """
    text = BUILD_SCRIPT.read_text()
    found: dict[str, str] = {}
    for var in ("K8S_VERSION", "ETCD_VERSION"):
        m = re.search(rf'^{var}="\$\{{{var}:-([^}}]+)\}}"', text, re.M)
        if not m:
            raise RuntimeError(f"cannot find {var} in {BUILD_SCRIPT}")
        found[var] = os.environ.get(var) or m.group(1)
    return found["K8S_VERSION"], found["ETCD_VERSION"]


def cache_root() -> Path:
    if os.environ.get("LLM_GATEWAY_CACHE"):
        return Path(os.environ["LLM_GATEWAY_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llm-gateway"


def cache_dir() -> Path:
    k8s, etcd = pinned_versions()
    return cache_root() / "envtest" / f"k8s-{k8s}-etcd-{etcd}"


def _has_binaries(d: Path) -> bool:
    return all(os.access(d / b, os.X_OK) and (d / b).is_file() for b in BINARIES)


def find_binaries() -> Path | None:
    """Directory holding both binaries, or None (builds nothing)."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and _has_binaries(Path(assets)):
        return Path(assets)
    d = cache_dir()
    if _has_binaries(d):
        return d
    return None


def find_go() -> str | None:
    go = shutil.which("go")
    if go:
        return go
    if os.access("/usr/local/go/bin/go", os.X_OK):
        return "/usr/local/go/bin/go"
    return None


def ensure_binaries(*, verbose: bool = True) -> Path:
    """Return the binaries dir, running build.sh first when needed.

    Raises BinariesUnavailable when nothing is found and Go is missing, and
    RuntimeError when the build itself fails.  A cold build takes ~15-25
    minutes on 2 cores; a warm one is instant.
    """
    found = find_binaries()
    if found is not None:
        return found
    go = find_go()
    if go is None:
        raise BinariesUnavailable(
            "kube-apiserver/etcd not found: set KUBEBUILDER_ASSETS to a dir with "
            "kube-apiserver and etcd, or install Go so controlplane/build.sh can "
            "build them"
        )
    env = dict(os.environ, GO=go)
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-4000:]
        raise RuntimeError(f"controlplane/build.sh failed (exit {proc.returncode})\n{tail}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError("controlplane/build.sh printed no directory")
    d = Path(lines[-1].strip())
    if not _has_binaries(d):
        raise RuntimeError(f"controlplane/build.sh reported {d}, which lacks {BINARIES}")
    return d


if __name__ == "__main__":  # python -m controlplane.binaries
    print(ensure_binaries(), file=sys.stdout)
