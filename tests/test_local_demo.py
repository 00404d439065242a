"""The README's first command, as a test: configs/local.yaml's app with its embedded simulators."""

from __future__ import annotations

import random
import socket

import openai
import pytest
import yaml

from tests.support import wait_until

pytestmark = pytest.mark.timeout(180)


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
