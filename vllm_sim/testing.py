"""Run simulators as real subprocesses from tests: start, wait until ready, stop by PID.

    sim = SimulatorProcess(["--model", "m", "--ttft", "0"]).start().wait_ready()
    client = openai.OpenAI(base_url=sim.openai_base_url, api_key="x")
    ...
    sim.stop()

stdout and stderr go to a temporary log file (kept across restarts; removed by
`close()` or at interpreter exit unless VLLM_SIM_KEEP_LOGS is set), and every failure
to become ready quotes its tail. Only the standard
library is used, so any test suite can import this module.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import LOADING_PREFIX, READY_PREFIX

__all__ = [
    "LOADING_PREFIX", "READY_PREFIX", "SimulatorError", "SimulatorProcess", "free_port",
    "metric_value",
]

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_LIVE: "weakref.WeakSet[SimulatorProcess]" = weakref.WeakSet()
_LOGS: set[Path] = set()  # removed at exit unless VLLM_SIM_KEEP_LOGS is set


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Below Linux's ephemeral range (32768-60999 by default: every outgoing connection takes
# one) and above Ray's worker ports (10002-19999): a port picked here stays free unless
# something binds it on purpose, while a kernel-picked free port can be taken by the next
# outgoing connection before the process that needs it binds it.
_RUN_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def free_port_run(count: int) -> int:
    """A port P with P .. P+count-1 all free (on every interface) and not handed out before
    in this process: for a simulator's HTTP port plus its KV event and replay ports."""
    import random

    rng = random.Random()
    for _ in range(1000):
        base = rng.randrange(_RUN_RANGE[0], _RUN_RANGE[1] - count)
        ports = range(base, base + count)
        if _handed_out.intersection(ports):
            continue
        if all(port_bindable(port) for port in ports):
            _handed_out.update(ports)
            return base
    raise RuntimeError(f"no run of {count} free ports in {_RUN_RANGE}")


def port_bindable(port: int) -> bool:
    """Nothing listens on `port` (any interface) right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class SimulatorError(RuntimeError):
    """The simulator process failed to start, died, or did not become ready."""


class SimulatorProcess:
    """One `python -m vllm_sim` child process on a fixed loopback port.

    `args` are extra CLI arguments; `--host`/`--port` are added, and `--model sim-model`
    too unless `args` name a model. The port stays the same across `restart()`, so a
    gateway configured with `url` finds the new process there.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        log = tempfile.NamedTemporaryFile(prefix="vllm_sim-", suffix=".log", delete=False)
        log.close()
        self.log_path = Path(log.name)
        _LOGS.add(self.log_path)
        self._log_offset = 0  # where the current run's output starts

    # ----- addresses -------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT (what a gateway's replica list holds)."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The `base_url` for `openai.OpenAI(...)`."""
        return self.url + "/v1"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise SimulatorError("simulator not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ----- process control -------------------------------------------------------

    def command(self) -> list[str]:
        args = list(self.args)
        if "--model" not in args:
            args += ["--model", "sim-model"]
        return [sys.executable, "-m", "vllm_sim", "--host", self.host, "--port", str(self.port), *args]

    def start(self, args: Sequence[str] | None = None) -> "SimulatorProcess":
        """Spawn the process (replacing the extra args if given); returns self."""
        if self.is_running():
            raise SimulatorError(f"simulator already running (pid {self.pid})")
        if args is not None:
            self.args = list(args)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start: {' '.join(self.command())}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env,
            )
        _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = 15.0, *, require_healthy: bool = True) -> "SimulatorProcess":
        """Block until the 'listening' line is printed and /health answers.

        With `require_healthy=False` any HTTP answer counts (e.g. started `--unhealthy`).
        Raises SimulatorError with the log tail if the process exits or time runs out.
        """
        deadline = time.monotonic() + timeout
        listening = False
        while True:
            if self.proc is None:
                raise SimulatorError("simulator not started")
            code = self.proc.poll()
            if code is not None:
                raise SimulatorError(f"simulator exited with code {code}\n{self.log_tail()}")
            if not listening:
                listening = READY_PREFIX in self.log_text(current_run=True)
            if listening:
                status = self._probe_health()
                if status == 200 or (status is not None and not require_healthy):
                    return self
            if time.monotonic() >= deadline:
                raise SimulatorError(
                    f"simulator not ready after {timeout}s (listening={listening})\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def wait_for_output(self, text: str, timeout: float = 15.0) -> None:
        """Block until this run of the process printed `text` (e.g. LOADING_PREFIX)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text(current_run=True):
            if self.proc is None or self.proc.poll() is not None:
                raise SimulatorError(f"simulator exited before printing {text!r}\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise SimulatorError(f"{text!r} not printed after {timeout}s\n{self.log_tail()}")
            time.sleep(0.01)

    def _probe_health(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, urllib.error.URLError):
            return None

    def send_signal(self, sig: int) -> None:
        if self.is_running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; returns its exit code."""
        if self.proc is None:
            raise SimulatorError("simulator not started")
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL (a crash without any goodbye) and reap."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(5)

    def restart(
        self, args: Sequence[str] | None = None, *, wait: bool = True, timeout: float = 15.0
    ) -> "SimulatorProcess":
        """Stop (gracefully) and start again on the same port."""
        self.stop()
        self.start(args)
        if wait:
            self.wait_ready(timeout)
        return self

    def close(self) -> None:
        """Stop the process and delete the log file."""
        try:
            self.stop()
        finally:
            _LIVE.discard(self)
            _LOGS.discard(self.log_path)
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "SimulatorProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- logs ------------------------------------------------------------------

    def log_text(self, *, current_run: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as log:
                if current_run:
                    log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.log_path} (last {len(tail)} lines):\n" + "\n".join(tail)

    # ----- /sim/* helpers ----------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, bytes]:
        """A small HTTP call to the simulator; returns (status, body) without raising on 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        status, raw = self.request(method, path, body)
        if status != 200:
            raise SimulatorError(f"{method} {path} -> {status}: {raw[:500]!r}")
        return json.loads(raw)

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge fault knobs (None/False resets one); returns the current settings."""
        return self._json("POST", "/sim/faults", faults)

    def reset_faults(self) -> dict[str, Any]:
        return self._json("DELETE", "/sim/faults")

    def faults(self) -> dict[str, Any]:
        return self._json("GET", "/sim/faults")

    def stats(self) -> dict[str, Any]:
        return self._json("GET", "/sim/stats")

    def record(self, request_id: str) -> bytes | None:
        """The exact response body bytes the simulator wrote for that request id."""
        status, raw = self.request("GET", f"/sim/record/{request_id}")
        return raw if status == 200 else None

    def metrics_text(self) -> str:
        status, raw = self.request("GET", "/metrics")
        if status != 200:
            raise SimulatorError(f"/metrics -> {status}")
        return raw.decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """Sum of the samples of `name` whose labels include `labels` (None if absent)."""
        return metric_value(self.metrics_text(), name, **labels)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited={self.returncode}"
        return f"<SimulatorProcess {self.url} pid={self.proc.pid if self.proc else None} {state}>"


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Sum the Prometheus samples called `name` that carry all of `labels`."""
    total: float | None = None
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " "):
            continue
        label_part = rest[1 : rest.index("}")] if rest.startswith("{") else ""
        if all(w in label_part.split(",") for w in wanted):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


@atexit.register
def _clean_up_at_exit() -> None:
    """Never leave a simulator (or its log file) behind when the test process exits."""
    for sim in list(_LIVE):
        if sim.proc is not None and sim.proc.poll() is None:
            sim.proc.kill()
            sim.proc.wait(5)
    if not os.environ.get("VLLM_SIM_KEEP_LOGS"):
        for path in list(_LOGS):
            path.unlink(missing_ok=True)
