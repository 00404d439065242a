"""What the benchmarks share: percentiles, CPU time from /proc, simulators, Serve's PIDs and ports.

Standard library only at import time (psutil and Ray are imported where used), so a
benchmark can set Ray's environment switches before Ray is imported.

- `percentile(values, q)`: nearest-rank percentile (None for no values).
- `proc_cpu_s(pid)`, `machine_busy_s()`, `CpuMeter`: CPU seconds per process (all
  threads, user + system) and of the whole machine, read from /proc (Linux).
- `start_simulators(...)` / `stop_simulators(...)`: `vllm_sim` processes, started
  together, waited for together, stopped by PID (`SimulatorProcess`).
- `serve_mode_environment(mode)`: the environment Ray must see when it starts for
  Serve's ingress mode (`proxy`, `direct`, `haproxy`).
- `serve_details()`, `serve_replica_pids(app)`, `direct_ingress_ports(app)`,
  `listener_of(port)`: where an application's replicas run and which process answers
  a port (Serve's proxy actor has no PID in `get_serve_details()`; the process that
  listens on `http_options.port` is it).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_sim.testing import SimulatorProcess, free_port  # noqa: E402  (stdlib only)

__all__ = [
    "CpuMeter", "REPO", "SimulatorProcess", "direct_ingress_ports", "free_port", "listener_of",
    "machine_busy_s", "percentile", "proc_cpu_s", "process_tree", "rss_bytes", "serve_details",
    "serve_mode_environment", "serve_replica_pids", "start_simulators", "stop_simulators",
]


# --------------------------------------------------------------------------------------
# Percentiles
# --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --------------------------------------------------------------------------------------
# CPU accounting from /proc (Linux): which process spent the CPU time
# --------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of every thread of `pid`, in seconds (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy (not idle, iowait or steal)."""
    try:
        with open("/proc/stat", "rb") as f:
            parts = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in parts[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


class CpuMeter:
    """CPU seconds per group of PIDs; 'other' is the rest of the machine (Ray, other users)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items() if pids}

    def read(self) -> dict[str, float] | None:
        busy = machine_busy_s()
        if busy is None:
            return None
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            out[name] = sum(v for v in (proc_cpu_s(p) for p in pids) if v is not None)
        out["_machine"] = busy
        return out

    @staticmethod
    def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
        """Seconds per group between two reads, plus 'other' and 'total' (the machine)."""
        if not before or not after:
            return {}
        d = {k: max(0.0, after[k] - before.get(k, 0.0)) for k in after}
        machine = d.pop("_machine")
        d["other"] = max(0.0, machine - sum(d.values()))
        d["total"] = machine
        return d


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (psutil if present; else just `pid`)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return [pid, *(child.pid for child in proc.children(recursive=True))]
    except Exception:  # noqa: BLE001 - gone, or no psutil
        return [pid]


def rss_bytes(pids: Iterable[int]) -> int | None:
    """Resident memory of the given processes, summed (None if none could be read)."""
    total = None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        total = (total or 0) + pages * os.sysconf("SC_PAGE_SIZE")
    return total


# --------------------------------------------------------------------------------------
# Simulators
# --------------------------------------------------------------------------------------


def start_simulators(
    count: int, args: Sequence[str], *, ports: Sequence[int] | None = None, timeout: float = 30.0,
    extra_args: Sequence[Sequence[str]] | None = None,
) -> list[SimulatorProcess]:
    """Start `count` simulators with `args` (plus `extra_args[i]` for the i-th), then wait
    for all of them; on failure every one already started is stopped again."""
    sims: list[SimulatorProcess] = []
    try:
        for i in range(count):
            sim_args = [*args, *(extra_args[i] if extra_args else ())]
            sim = SimulatorProcess(sim_args, port=ports[i] if ports else None)
            sims.append(sim)
            sim.start()
        for sim in sims:
            sim.wait_ready(timeout=timeout)
    except BaseException:
        stop_simulators(sims)
        raise
    return sims


def stop_simulators(sims: Iterable[SimulatorProcess]) -> None:
    """Stop each simulator by its PID (SIGTERM, then SIGKILL) and remove its log."""
    for sim in sims:
        try:
            sim.close()
        except Exception:  # noqa: BLE001 - keep stopping the others
            pass


# --------------------------------------------------------------------------------------
# Ray Serve: ingress modes, replica PIDs, ports
# --------------------------------------------------------------------------------------


def serve_mode_environment(mode: str) -> dict[str, str]:
    """Environment variables Ray must see when it starts, for Serve's ingress `mode`."""
    return {
        # Explicit "0" rather than unset: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 would otherwise
        # turn direct ingress on by default.
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if mode in ("direct", "haproxy") else "0",
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if mode == "haproxy" else "0",
        # Only how long an ingress replica drains at shutdown (default 30 s floor).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        # HAProxy's stats/metrics frontends and the fallback Python proxy default to
        # fixed ports (8404, 9101, 8500, 9500): give them free ones.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_DEDUP_LOGS": "0",
    }


def serve_details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def serve_replica_pids(app: str, details: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """deployment name -> PIDs of its RUNNING replicas, for one Serve application."""
    details = details if details is not None else serve_details()
    deployments = details.get("applications", {}).get(app, {}).get("deployments", {})
    return {
        name: [r["pid"] for r in dep.get("replicas", []) if r.get("pid") and r.get("state") == "RUNNING"]
        for name, dep in deployments.items()
    }


def direct_ingress_ports(app: str, want: int, timeout_s: float = 60.0) -> list[int]:
    """The HTTP ports of an application's ingress replicas in direct-ingress mode.

    The controller publishes them as target groups once every replica has its port.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        ports: list[int] = []
        for group in serve_details().get("target_groups") or []:
            targets = group.get("targets") or [{}]
            if (group.get("protocol") == "HTTP" and group.get("app_name") == app
                    and str(targets[0].get("name", "")).startswith("SERVE_REPLICA")):
                ports.extend(t["port"] for t in targets)
        if len(ports) >= want:
            return sorted(ports)
        if time.monotonic() > deadline:
            raise RuntimeError(f"direct ingress: {len(ports)} of {want} replica ports of {app!r} after {timeout_s:.0f}s")
        time.sleep(0.5)


def listener_of(port: int) -> dict[str, Any] | None:
    """Which process listens on `port` (psutil comes with Ray): pid, name, exe, start time."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                proc = psutil.Process(conn.pid)
                return {"pid": conn.pid, "name": proc.name(), "exe": proc.exe(), "started": proc.create_time()}
    except (psutil.Error, OSError):
        return None
    return None
