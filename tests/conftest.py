"""Shared fixtures: a real local Ray + Serve, simulated vLLM replicas as real processes."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.support import wait_until
from vllm_sim.testing import SimulatorProcess, free_port

pytest_plugins = ["controlplane.pytest_plugin"]


@pytest.fixture(scope="session")
def serve_http() -> Iterator[str]:
    """One local Ray and Serve for the whole session, in the shipped ingress mode; yields the HTTP base URL.

    The mode is what `python -m serve_app` and the RayService start (`serve_app.launch`):
    HAProxy on the HTTP port in front of the Gateway replicas' own ports. Ray reads it from
    the environment when it starts, so it is set before `ray.init`. (Serve's Python proxy
    is covered by tests/test_local_demo.py, in a Ray of its own.)
    """
    import ray
    from ray import serve

    from bench.common import listener_of, serve_mode_environment
    from serve_app.launch import SHIPPED_MODE

    # LLM_GATEWAY_TEST_INGRESS=proxy runs the suite on Serve's Python proxy instead, to compare.
    mode = os.environ.get("LLM_GATEWAY_TEST_INGRESS", SHIPPED_MODE)
    entry = {"haproxy": "haproxy", "proxy": "ray::ProxyActor"}.get(mode)
    if entry is None:
        raise pytest.UsageError(f"LLM_GATEWAY_TEST_INGRESS={mode!r}: the suite talks to one entry port; use haproxy or proxy")
    os.environ.update(serve_mode_environment(mode))
    ray.init(num_cpus=4, include_dashboard=False, namespace="gateway-tests", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # Every test below talks to the port as a user would: it must be the mode's (HAProxy's).
        wait_until(lambda: (listener_of(port) or {}).get("name") == entry, 60,
                   f"{entry} to listen on :{port} (found {listener_of(port)})")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def simulators() -> Iterator[Callable[..., list[SimulatorProcess]]]:
    """Start simulated vLLM replicas; every one is stopped by PID at teardown."""
    started: list[SimulatorProcess] = []

    def start(count: int = 1, *args: str, wait: bool = True, model: str = "sim-model") -> list[SimulatorProcess]:
        procs = []
        for _ in range(count):
            proc = SimulatorProcess(["--model", model, "--ttft", "0.01", "--itl", "0.002", *args])
            proc.start()
            started.append(proc)
            procs.append(proc)
        if wait:
            for proc in procs:
                proc.wait_ready(timeout=30)
        return procs

    yield start
    for proc in started:
        proc.stop()


CHAT = [{"role": "user", "content": "Say something deterministic."}]


@dataclass
class GatewayUnderTest:
    url: str

    def sdk(self, timeout: float = 60) -> openai.OpenAI:
        """The OpenAI SDK pointed at the gateway, with its own retries off."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)

    def served_by(self, n: int, model: str = "sim-model", **kwargs: Any) -> Counter:
        """Send n chat requests; count which replica served each (every one must succeed)."""
        seen: Counter = Counter()
        sdk = self.sdk()
        for _ in range(n):
            raw = sdk.chat.completions.with_raw_response.create(model=model, messages=CHAT, max_tokens=4, **kwargs)
            assert raw.http_response.status_code == 200
            assert raw.parse().choices[0].message.content
            seen[raw.headers["x-gateway-replica"]] += 1
        return seen

    def table(self) -> dict:
        return httpx.get(self.url + "/admin/replicas", timeout=5).json()

    def states(self) -> dict[str, str]:
        return {row["replica_id"]: row["state"] for row in self.table()["replicas"]}

    def metrics(self) -> dict[str, float]:
        """The gateway's fleet-wide /metrics figures as {'name{labels}': value} (summed if repeated)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        figures: dict[str, float] = {}
        for name, labels, value in re.findall(r"^(gateway_\w+)(\{[^}]*\})? (\S+)$", text, re.M):
            figures[name + labels] = figures.get(name + labels, 0.0) + float(value)
        return figures

    def wait_states(self, expected: dict[str, str], timeout: float = 20) -> None:
        wait_until(lambda: all(self.states().get(k) == v for k, v in expected.items()), timeout, f"replica states {expected}")


FAST_HEALTH = {"probe_interval_s": 0.5, "probe_timeout_s": 1.0, "metrics_interval_s": 0.5, "ejection_base_s": 0.5}


@pytest.fixture
def gateway(serve_http: str) -> Iterator[Callable[..., GatewayUnderTest]]:
    """Deploy the gateway app over given replica URLs; deleted at teardown."""
    from ray import serve

    from serve_app.config import GatewayConfig
    from serve_app.control import ReplicaHealth
    from serve_app.ingress import Gateway

    def deploy(
        urls: list[str],
        ingress_replicas: int = 1,
        models: dict[str, list[str]] | None = None,
        max_ongoing_requests: int | None = None,
        **overrides: Any,
    ) -> GatewayUnderTest:
        discovery = overrides.pop("discovery", {"kind": "static", "urls": urls, "models": models or {}})
        # The tests compare x-gateway-replica with the simulators' URLs: show them (the
        # default hides them from clients; tests/test_security.py checks that).
        overrides.setdefault("expose_replica_urls", True)
        config = GatewayConfig.model_validate({"discovery": discovery, "health": FAST_HEALTH, **overrides})
        options: dict[str, Any] = {"num_replicas": ingress_replicas, "ray_actor_options": {"num_cpus": 0}}
        if max_ongoing_requests is not None:  # the Gateway's Serve slots, as `deployments:` would set them
            options["max_ongoing_requests"] = max_ongoing_requests
        app = Gateway.options(**options).bind(config, ReplicaHealth.bind(config))
        serve.run(app, name="gateway", route_prefix="/")
        return GatewayUnderTest(serve_http)

    yield deploy
    serve.delete("gateway")
