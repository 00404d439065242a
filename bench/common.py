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
  listens on `http_options.port` is it: `haproxy`, `ray::ProxyActor`, ...).
- `stop_serve_and_ray(...)`: the teardown every Serve benchmark does.
- `RouterProcess`: `vllm-router` / `sglang-router` as a child process, stopped by PID.
- `fmt(value, width)`: one table cell.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_sim.testing import SimulatorProcess, free_port  # noqa: E402  (stdlib only)

__all__ = [
    "CpuMeter", "REPO", "RouterProcess", "RouterUnavailable", "SimulatorProcess", "direct_ingress_ports", "fmt",
    "free_port", "installed_version", "listener_of", "machine_busy_s", "percentile", "proc_cpu_s", "process_started",
    "process_tree", "rss_bytes", "serve_details", "serve_mode_environment", "serve_replica_pids", "start_simulators",
    "stop_serve_and_ray", "stop_simulators",
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
    """CPU seconds per group of PIDs; 'other' is the rest of the machine (Ray, other users).

    A group is a list of PIDs, or a function that returns them when read (for a process
    that is replaced while it runs, e.g. HAProxy, which Serve reloads as a new process).
    """

    def __init__(self, groups: dict[str, list[int] | Callable[[], list[int]]]) -> None:
        self.groups = {name: pids if callable(pids) else list(pids) for name, pids in groups.items() if pids}

    def read(self) -> dict[str, float] | None:
        busy = machine_busy_s()
        if busy is None:
            return None
        out: dict[str, float] = {}
        for name, group in self.groups.items():
            pids = group() if callable(group) else group
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
    """Environment variables Ray must see when it starts, for Serve's ingress `mode`.

    The switches are `serve_app.launch.ingress_environment(mode)` (what `python -m serve_app`
    ships); the rest makes a run share the machine: HAProxy's stats/metrics frontends and the
    fallback Python proxy default to fixed ports (8404, 9101, 8500, 9500), so they get free
    ones, and an ingress replica being stopped drains for 0 s instead of at least 30 s.
    """
    from serve_app.launch import ingress_environment  # stdlib only

    return {
        **ingress_environment(mode),
        # Only how long an ingress replica drains at shutdown (default 30 s floor).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
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
    """Which process listens on TCP `port` (any address): pid, name, exe, start time.

    Read from /proc (Linux; no psutil, which Ray only puts on the path once imported):
    the listening socket's inode from /proc/net/tcp{,6}, then the process holding it.
    `name` is the program as the process shows itself: `haproxy`, `ray::ProxyActor`,
    `ray::ServeReplica:app:Deployment`. `started` is in clock ticks since boot, enough to
    tell a process from a later one with the same PID.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        inodes.add(f"socket:[{fields[9]}]")
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            with fds:
                if not any(_readlink(fd.path) in inodes for fd in fds):
                    continue
            pid = int(entry.name)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            started = process_started(pid)
        except (OSError, ValueError, IndexError):
            continue
        name = argv[0].decode(errors="replace").strip() if argv and argv[0] else ""
        name = name.rsplit("/", 1)[-1] if not name.startswith("ray::") else name
        return {"pid": pid, "name": name, "exe": _readlink(f"/proc/{pid}/exe"), "started": started}
    return None


def process_started(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (None if it is gone): with the PID, names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def stop_serve_and_ray(log: Callable[[str], None], *, serve_started: bool, ray_started: bool) -> None:
    """`serve.shutdown()` (apps, proxies, HAProxy go down as Serve means them to), then `ray.shutdown()`.

    Only what this process started; each step logs its failure and the next one still runs.
    """
    if serve_started:
        try:
            import ray

            if ray.is_initialized():  # serve.shutdown() would ray.init() otherwise
                from ray import serve

                log("serve.shutdown()")
                serve.shutdown()
        except BaseException as exc:  # noqa: BLE001 - keep tearing down
            log(f"serve.shutdown failed: {exc!r}")
    if ray_started:
        try:
            import ray

            log("ray.shutdown()")
            ray.shutdown()
        except BaseException as exc:  # noqa: BLE001
            log(f"ray.shutdown failed: {exc!r}")


# --------------------------------------------------------------------------------------
# Peer routers (vllm-router, sglang-router) as child processes
# --------------------------------------------------------------------------------------


def installed_version(dist: str) -> str | None:
    try:
        import importlib.metadata as md

        return md.version(dist)
    except Exception:  # noqa: BLE001
        return None


class RouterUnavailable(RuntimeError):
    """The peer router cannot run here; the reason goes in the table."""


class RouterProcess:
    """`vllm-router` or `sglang-router` over `urls` as a child process, stopped by its PID.

    `extra` is appended to the command line (e.g. KV event sources). `start()` waits for
    its `/health`; `pids()` is its process tree for CPU accounting.
    """

    DISTS = {"vllm": "vllm-router", "sglang": "sglang-router"}

    def __init__(self, kind: str, policy: str, urls: Sequence[str], extra: Sequence[str] = ()) -> None:
        self.kind, self.policy, self.urls, self.extra = kind, policy, list(urls), list(extra)
        self.dist = self.DISTS[kind]
        self.version = installed_version(self.dist)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: Any = None
        self.log_path: Path | None = None

    def command(self) -> list[str]:
        import shutil

        if self.version is None:
            raise RouterUnavailable(f"{self.dist} is not installed (pip install -e '.[bench]')")
        common = ["--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *self.urls, "--policy", self.policy,
                  "--prometheus-port", str(free_port()), "--prometheus-host", "127.0.0.1",
                  # Like the gateway's prober: a dead replica is noticed within seconds.
                  "--health-check-interval-secs", "2"]
        if self.kind == "sglang":
            return [sys.executable, "-m", "sglang_router.launch_router", *common, "--log-level", "warn", *self.extra]
        exe = shutil.which("vllm-router")
        return [*([exe] if exe else [sys.executable, "-m", "vllm_router.launch_router"]), *common,
                "--log-level", "warning", *self.extra]

    def start(self, timeout_s: float = 90.0) -> None:
        import subprocess
        import tempfile
        import urllib.request

        cmd = self.command()
        with tempfile.NamedTemporaryFile(prefix=f"bench-{self.dist}-", suffix=".log", delete=False) as log_file:
            self.log_path = Path(log_file.name)
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "NO_COLOR": "1", "RUST_LOG_STYLE": "never"})
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RouterUnavailable(f"{self.dist} exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RouterUnavailable(f"{self.dist} not healthy after {timeout_s:.0f}s: {self.log_tail()}")
            time.sleep(0.3)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []

    def log_tail(self, chars: int = 600) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))
        lines = [line for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-4:])[-chars:]

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.log_path is not None and not os.environ.get("BENCH_KEEP_LOGS"):
            self.log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def fmt(value: Any, width: int, digits: int = 2, big: float = 100) -> str:
    """A right-aligned table cell: '-' for None, thousands separators, no decimals from `big` up."""
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        text = f"{value:,.{digits}f}" if abs(value) < big else f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return text.rjust(width)
