"""The embedded demo: simulated vLLM replicas started beside the gateway.

A deployment of its own, so killing or restarting the health actor never takes the
demo's replicas with it. Children are stopped by PID on shutdown, and the kernel
sends them SIGTERM if this process dies first (PR_SET_PDEATHSIG), so none outlive it.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
from typing import Any

from ray import serve

from .config import EmbeddedSimulators, GatewayConfig, load_config

log = logging.getLogger("ray.serve")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the explicit stop below still runs


def start_simulators(sims: EmbeddedSimulators) -> list[subprocess.Popen]:
    procs = []
    for i in range(sims.replicas):
        cmd = [
            sys.executable, "-m", "vllm_sim",
            "--host", sims.host,
            "--port", str(sims.base_port + i),
            "--model", sims.model,
            *sims.extra_args,
        ]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
        )
    log.info("started %d simulated vLLM replica(s) for model %r", len(procs), sims.model)
    return procs


def stop_simulators(procs: list[subprocess.Popen], timeout_s: float = 5.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@serve.deployment(name="LocalSimulators", num_replicas=1, ray_actor_options={"num_cpus": 0})
class LocalSimulators:
    def __init__(self, config: dict[str, Any] | GatewayConfig | None = None) -> None:
        cfg = config if isinstance(config, GatewayConfig) else load_config(config)
        self._procs = start_simulators(cfg.simulators) if cfg.simulators else []

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def __del__(self) -> None:
        stop_simulators(self._procs)
