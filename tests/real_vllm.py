"""Real vLLM for tests: the venv from .ci/install-vllm.sh, a tiny generated model, servers as processes.

    fleet = real_vllm.fleet(request)      # once per session, shared by every module
    a, b = fleet.servers(2)               # running and healthy (restarted if a test stopped one)
    openai.OpenAI(base_url=a.url + "/v1", api_key="x")

Engine start-up is the cost (a minute or more on 2 cores), so the servers are started once
per test session and shared; a test that stops or kills one leaves it to `servers()` to
start it again for the next test. Every process is stopped by its PID: each server runs
in a session (process group) of its own, whose id is its PID, so its engine-core and
worker children go with it.

Where the venv is missing, `require_vllm()` fails the test under CI=true (CI installs it)
and skips it elsewhere, naming the command that installs it.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vllm_sim.testing import free_port_run

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLM_GATEWAY_CACHE", Path.home() / ".cache" / "llm-gateway"))
MODEL = "tiny-model"  # the served name
KV_OFFSET = 1  # KV events on the HTTP port + 1, their replay socket on + 2 (the gateway's port_offset)
BLOCK_SIZE = 128  # vLLM's KV block size on CPU
START_TIMEOUT_S = float(os.environ.get("REAL_VLLM_START_TIMEOUT_S", "900"))
ENGINE_ARGS = [
    "--max-model-len", "2048", "--dtype", "float32", "--enable-prefix-caching",
    "--enforce-eager",  # no torch.compile warm-up: a minute less per start, same server
    "--max-num-seqs", "16", "--shutdown-timeout", "30",
]
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: 2048 blocks of 128 tokens
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # two servers share 2 cores with everything else
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def vllm_python() -> Path | None:
    """The real-vLLM venv's python, or None if .ci/install-vllm.sh has not completed."""
    explicit = os.environ.get("LLM_GATEWAY_VLLM_PYTHON")
    if explicit:
        return Path(explicit)
    current = CACHE / "vllm-venv" / "current"
    if (current / ".complete").is_file() and (current / "bin" / "python").exists():
        return current / "bin" / "python"
    return None


def require_vllm() -> Path:
    python = vllm_python()
    if python is None:
        message = (f"real vLLM is not installed (no complete venv at {CACHE / 'vllm-venv' / 'current'}): "
                   "run `bash .ci/install-vllm.sh` (.ci/run does)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return python


def _port_run(count: int, host: str = "127.0.0.1") -> int:
    """A port P with P .. P+count-1 all free, outside the ephemeral range (vllm_sim.testing)."""
    return free_port_run(count)


def generate_model(python: Path, out: Path, *extra: str, timeout: float = 600) -> Path:
    """Write the tiny Llama + tokenizer (tests/real_vllm_model.py) into `out`."""
    result = subprocess.run(
        [str(python), str(REPO / "tests" / "real_vllm_model.py"), str(out), *extra],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENGINE_ENV},
    )
    if result.returncode != 0:
        raise RuntimeError(f"model generation failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return out


class VLLMServer:
    """One real `vllm.entrypoints.openai.api_server` on loopback, KV events on, fixed ports."""

    def __init__(self, python: Path, model_dir: Path, name: str = MODEL, extra_args: list[str] | None = None) -> None:
        self.python = python
        self.model_dir = model_dir
        self.name = name
        self.extra_args = list(extra_args or [])
        self.host = "127.0.0.1"
        self.port = _port_run(1 + KV_OFFSET + 1)  # HTTP, then the KV event and replay ports
        self.kv_port = self.port + KV_OFFSET
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0
        self.ready_after_s: float | None = None  # the last start's time to healthy
        log = tempfile.NamedTemporaryFile(prefix="real-vllm-", suffix=".log", delete=False)
        log.close()
        self.log_path = Path(log.name)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kv_events_config(self) -> dict[str, Any]:
        # The publisher binds only for a wildcard endpoint (otherwise it connects out).
        return {"enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://*:{self.kv_port}", "replay_endpoint": f"tcp://*:{self.kv_port + 1}"}

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
            "--served-model-name", self.name, "--host", self.host, "--port", str(self.port),
            "--kv-events-config", json.dumps(self.kv_events_config()), *ENGINE_ARGS, *self.extra_args,
        ]

    def start(self) -> "VLLMServer":
        assert not self.is_running(), "already running"
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            # A session of its own: its process group id is its PID, which reaches the
            # engine-core and worker processes it spawns.
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **ENGINE_ENV}, start_new_session=True, cwd=tempfile.gettempdir(),
            )
        self.starts += 1
        self.started_at = time.monotonic()
        self.ready_after_s = None
        _LIVE[self.pid] = self
        return self

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "VLLMServer":
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise RuntimeError(f"vLLM exited ({self.proc and self.proc.returncode})\n{self.log_tail()}")
            if self.healthy():
                self.ready_after_s = time.monotonic() - self.started_at
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM not healthy after {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(0.25)

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the server's process group (its PID), if it is still there."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server and its children at once: a crash, no goodbye."""
        self.signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)
            _LIVE.pop(self.proc.pid, None)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (vLLM drains for up to --shutdown-timeout), then SIGKILL the group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)  # children that outlived the API server
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.pop(self.proc.pid, None)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return resp.read().decode()


class Fleet:
    """The session's shared tiny model and real vLLM servers."""

    def __init__(self, python: Path) -> None:
        self.python = python
        self.workdir = Path(tempfile.mkdtemp(prefix="real-vllm-"))
        started = time.monotonic()
        self.model_dir = generate_model(python, self.workdir / "tiny-llama")
        self.model_generation_s = time.monotonic() - started
        self._servers: list[VLLMServer] = []
        self._lock = threading.Lock()

    def servers(self, count: int) -> list[VLLMServer]:
        """`count` servers, each running and healthy; dead ones are started again (in parallel)."""
        with self._lock:
            while len(self._servers) < count:
                self._servers.append(VLLMServer(self.python, self.model_dir))
            chosen = self._servers[:count]
            for server in chosen:
                if not server.is_running():
                    if server.proc is not None:
                        server.stop()  # reap it and anything left of its group
                    server.start()
            for server in chosen:
                server.wait_ready()
            return chosen

    def close(self) -> None:
        for server in self._servers:
            server.stop(timeout=20)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if not os.environ.get("REAL_VLLM_KEEP_LOGS"):
            for server in self._servers:
                server.log_path.unlink(missing_ok=True)


_LIVE: dict[int, VLLMServer] = {}
_FLEET: Fleet | None = None


def fleet(request: pytest.FixtureRequest) -> Fleet:
    """The session's Fleet (created at the first call, closed when pytest ends)."""
    global _FLEET
    python = require_vllm()
    if _FLEET is None:
        _FLEET = Fleet(python)
        request.config.add_cleanup(_close_fleet)
    return _FLEET


def _close_fleet() -> None:
    global _FLEET
    if _FLEET is not None:
        _FLEET.close()
        _FLEET = None


@atexit.register
def _kill_leftovers() -> None:  # an interrupted run: no engine outlives the interpreter
    for server in list(_LIVE.values()):
        server.signal_group(signal.SIGKILL)
