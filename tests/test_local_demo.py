"""The README's first command, as a test: configs/local.yaml's app with its embedded simulators."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from bench.common import listener_of, serve_mode_environment
from serve_app.app import SLOW_PROXY_WARNING
from tests.support import wait_until
from vllm_sim.testing import free_port

pytestmark = pytest.mark.timeout(300)


def _free_block(size: int) -> int:
    """A base port with `size` free ports after it (the demo's simulators use consecutive ports).

    The search starts at a random place, so two test runs sharing the machine do not both
    pick the first free block before either has bound it.
    """
    bases = list(range(21000, 30000, 17))
    start = random.randrange(len(bases))
    for base in bases[start:] + bases[:start]:
        try:
            socks = []
            for port in range(base, base + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port block")


def test_local_yaml_builds_a_working_gateway_with_embedded_replicas(serve_http) -> None:
    import httpx
    from ray import serve

    from serve_app.app import build_app

    with open("configs/local.yaml") as fh:
        (app_config,) = yaml.safe_load(fh)["applications"]
    assert app_config["import_path"] == "serve_app.app:build_app"
    args = app_config["args"]
    args["simulators"]["base_port"] = _free_block(args["simulators"]["replicas"])
    serve.run(build_app(args), name="demo", route_prefix="/")
    try:
        model = args["simulators"]["model"]
        last: list = []

        def all_ready() -> bool:
            last[:] = httpx.get(serve_http + "/admin/replicas", timeout=5).json()["replicas"]
            return [r["state"] for r in last] == ["READY"] * 3

        try:
            wait_until(all_ready, 60, "the three embedded replicas to be READY")
        except AssertionError as exc:
            seen_rows = [(r.get("replica_id"), r.get("state"), r.get("reason")) for r in last]
            raise AssertionError(f"{exc}; last seen: {seen_rows}") from None
        client = openai.OpenAI(base_url=serve_http + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [model]
        seen = set()
        for _ in range(9):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=16,
                extra_headers={"x-gateway-router": "round_robin"},
            )
            assert raw.parse().choices[0].message.content
            seen.add(raw.headers["x-gateway-replica"])
        assert len(seen) == 3
    finally:
        serve.delete("demo")
    base = args["simulators"]["base_port"]

    def simulators_stopped() -> bool:  # deleting the app stops the embedded replicas by PID
        for port in range(base, base + 3):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return False
        return True

    wait_until(simulators_stopped, 30, "the embedded simulators to stop with the app")


# --------------------------------------------------------------------------------------
# The README's first command as a user runs it: its own process, its own Ray
# --------------------------------------------------------------------------------------


def _local_config(tmp_path: Path) -> tuple[Path, int]:
    """configs/local.yaml with free ports (HTTP and the simulators'), written to tmp_path."""
    with open("configs/local.yaml") as fh:
        config = yaml.safe_load(fh)
    port = free_port()
    config["http_options"]["port"] = port
    sims = config["applications"][0]["args"]["simulators"]
    sims["base_port"] = _free_block(sims["replicas"])
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def _user_environment() -> dict[str, str]:
    """This environment as a fresh shell would have it: no Ray address or ingress switches
    (the session's own Ray set them here), and free ports where Serve defaults to fixed ones,
    since other test runs share the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_ENABLE_", "RAY_ADDRESS"))}
    env.update({k: v for k, v in serve_mode_environment("proxy").items() if not k.startswith("RAY_SERVE_ENABLE_")})
    return env


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat", "rb") as fh:
            pid = int(fh.read().rsplit(b")", 1)[1].split()[1])
    return False


class ServeRun:
    """`argv` (a `serve run`) as a child process in its own session; stopped by its PID."""

    def __init__(self, argv: list[str], tmp_path: Path) -> None:
        self.log_path = tmp_path / "serve-run.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, env=_user_environment(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
            # Python turns SIGINT into KeyboardInterrupt only if it is not ignored (as in a background job).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, base: str, timeout: float = 150) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"serve run exited with {self.proc.returncode}: {self.log()[-3000:]}"
            rows = httpx.get(base + "/admin/replicas", timeout=5).json()["replicas"]
            return [r["state"] for r in rows] == ["READY"] * 3

        wait_until(ready, timeout, "the demo's three replicas to be READY through the entry port")

    def stop(self) -> None:
        """Ctrl-C, as a user stops it (serve run then shuts Serve and its Ray down); SIGKILL if it hangs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what it started
                self.proc.wait(10)
        self._log.close()


def _talk(base: str) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert reply.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True
    ))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_the_readme_command_serves_through_haproxy(tmp_path: Path) -> None:
    """`python -m serve_app run configs/local.yaml` puts HAProxy on the entry port, in front of the Gateway."""
    config, port = _local_config(tmp_path)
    base = f"http://127.0.0.1:{port}"
    run = ServeRun([sys.executable, "-m", "serve_app", "run", str(config)], tmp_path)
    try:
        run.wait_ready(base)
        listener = listener_of(port)
        assert listener is not None, "nobody listens on the entry port"
        assert listener["name"] == "haproxy", f"the entry port is answered by {listener}, not HAProxy"
        assert _descends_from(listener["pid"], run.proc.pid), "that HAProxy is not the one this command started"
        _talk(base)
        assert "Python HTTP proxy" not in run.log()
    finally:
        run.stop()
    assert run.proc.returncode is not None
    wait_until(lambda: listener_of(port) is None, 30, "the entry port to be closed after Ctrl-C")


def test_plain_serve_run_still_works_on_the_python_proxy_and_says_it_is_slow(tmp_path: Path) -> None:
    """Serve's own `serve run CONFIG`, without the environment: the Python proxy answers, and a warning says so."""
    config, port = _local_config(tmp_path)
    base = f"http://127.0.0.1:{port}"
    serve_cli = Path(sys.executable).with_name("serve")
    argv = [str(serve_cli)] if serve_cli.exists() else [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    run = ServeRun([*argv, "run", str(config)], tmp_path)
    try:
        run.wait_ready(base)
        listener = listener_of(port)
        assert listener is not None and listener["name"] == "ray::ProxyActor", f"the entry port is answered by {listener}"
        _talk(base)
        wait_until(lambda: SLOW_PROXY_WARNING[:60] in run.log(), 30, "the slow-proxy warning in serve run's output")
    finally:
        run.stop()
