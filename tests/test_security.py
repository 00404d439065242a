"""The gateway as a front door (issue 9, "Security").

- API keys are compared in constant time against every key, and can come from a file (a
  mounted Kubernetes Secret) or an environment variable, not only from plaintext args;
- with keys set, /admin/* needs an admin key and /metrics can be protected; /readyz and
  /healthz stay open but reveal no internal address or error text;
- internal replica URLs do not reach clients unless `expose_replica_urls` is set;
- an upstream key (vLLM `--api-key`) is sent on probes and requests.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from aiohttp import web

from serve_app.config import ConfigError, GatewayConfig, load_config
from serve_app.ingress import gateway as gateway_module
from tests.support import wait_until
from vllm_sim.testing import free_port

pytestmark = pytest.mark.timeout(180)

MODEL = "sim-model"
CHAT = [{"role": "user", "content": "Say something deterministic."}]


# ---------------------------------------------------------------- config and key checks


def test_keys_come_from_a_file_and_an_environment_variable(tmp_path, monkeypatch) -> None:
    secret = tmp_path / "keys"
    secret.write_text("# mounted from a Secret\nkey-from-file\n\n  second-key  \n")
    monkeypatch.setenv("GW_KEYS", "env-one, env-two")
    config = load_config({"api_keys": ["inline"], "api_keys_file": str(secret), "api_keys_env": "GW_KEYS",
                          "admin_api_keys_env": "GW_KEYS"})
    assert sorted(config.resolve_keys("api_keys")) == sorted(
        [b"inline", b"key-from-file", b"second-key", b"env-one", b"env-two"])
    assert sorted(config.resolve_keys("admin_api_keys")) == [b"env-one", b"env-two"]
    assert "key-from-file" not in repr(config)  # never printed with the config


@pytest.mark.parametrize("args, fragment", [
    ({"api_keys_file": "/no/such/file"}, "api_keys_file: cannot read '/no/such/file'"),
    ({"api_keys_env": "GW_UNSET_VARIABLE"}, "api_keys_env: the environment variable 'GW_UNSET_VARIABLE' is not set"),
    ({"admin_api_keys_env": "GW_EMPTY"}, "admin_api_keys_env: 'GW_EMPTY' holds no key"),
    ({"protect_metrics": True}, "protect_metrics: needs api_keys or admin_api_keys"),
])
def test_key_sources_fail_with_a_message_naming_the_field(args, fragment, monkeypatch) -> None:
    monkeypatch.setenv("GW_EMPTY", " ")
    monkeypatch.delenv("GW_UNSET_VARIABLE", raising=False)
    config = load_config(args)
    with pytest.raises(ConfigError) as info:
        config.resolve_all_keys()
    assert fragment in str(info.value)


def test_a_key_is_compared_with_every_key_in_constant_time(monkeypatch) -> None:
    checker = gateway_module.KeyChecker([b"alpha", b"beta", b"gamma"])
    compared: list[tuple[bytes, bytes]] = []
    real = gateway_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gateway_module.hmac, "compare_digest", spy)
    assert checker.accepts("alpha") and checker.accepts("gamma")
    assert not checker.accepts("alphb") and not checker.accepts("")
    # Every key is compared every time, even after a match, and always as equal-length digests.
    assert len(compared) == 4 * 3
    assert all(len(a) == len(b) == 32 for a, b in compared)


# ---------------------------------------------------------------- through the real ingress


def test_admin_metrics_and_probes_need_the_right_key(simulators, gateway) -> None:
    (sim,) = simulators(1)
    gw = gateway([sim.url], api_keys=["client-key"], admin_api_keys=["admin-key"], protect_metrics=True)
    client = {"authorization": "Bearer client-key"}
    admin = {"authorization": "Bearer admin-key"}

    def get(path: str, headers: dict | None = None) -> httpx.Response:
        return httpx.get(gw.url + path, headers=headers or {}, timeout=10)

    for path in ("/admin/replicas", "/metrics"):
        assert get(path).status_code == 401
        assert get(path).json()["error"]["code"] == "invalid_api_key"
    assert get("/admin/replicas", client).status_code == 401  # a client key is not an admin key
    assert get("/admin/replicas", admin).status_code == 200
    assert get("/metrics", client).status_code == 200 and get("/metrics", admin).status_code == 200
    assert get("/v1/models").status_code == 401 and get("/v1/models", client).status_code == 200
    for path in ("/healthz", "/readyz"):
        assert get(path).status_code == 200
        assert sim.url not in get(path).text and "127.0.0.1" not in get(path).text


def test_admin_is_closed_when_client_keys_are_set_without_an_admin_key(simulators, gateway) -> None:
    (sim,) = simulators(1)
    gw = gateway([sim.url], api_keys=["client-key"])
    resp = httpx.get(gw.url + "/admin/replicas", headers={"authorization": "Bearer client-key"}, timeout=10)
    assert resp.status_code == 403
    assert "admin_api_keys" in resp.json()["error"]["message"]
    # /metrics stays open unless protect_metrics says otherwise.
    assert httpx.get(gw.url + "/metrics", timeout=10).status_code == 200


def test_replica_urls_stay_inside_unless_asked(simulators, gateway) -> None:
    from serve_app.config import GatewayConfig

    assert GatewayConfig.model_validate({}).expose_replica_urls is False  # hidden by default
    (sim,) = simulators(1)
    gw = gateway([sim.url], expose_replica_urls=False)  # (the test fixture shows them otherwise)
    payload = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    for stream in (False, True):
        resp = httpx.post(gw.url + "/v1/chat/completions", json={**payload, "stream": stream}, timeout=30)
        assert resp.status_code == 200
        shown = resp.headers["x-gateway-replica"]
        assert shown and sim.url not in shown and str(sim.port) not in shown
        assert shown == resp.headers["x-gateway-replica"]  # a stable id: the same replica, the same id
    again = httpx.post(gw.url + "/v1/chat/completions", json=payload, timeout=30)
    assert again.headers["x-gateway-replica"] == shown
    # Its failures do not show the address either.
    sim.kill()
    dead = httpx.post(gw.url + "/v1/chat/completions", json=payload, timeout=30)
    assert dead.status_code == 503 and sim.url not in dead.text and str(sim.port) not in dead.text


# ---------------------------------------------------------------- an upstream that wants a key


class KeyedReplica:
    """A minimal vLLM-like server started with `--api-key`: /v1/* need the key, /health does not."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[tuple[str, str | None]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("authorization")
        self.seen.append((request.path, auth))
        if request.path == "/health":
            return web.Response(status=200)
        if auth != f"Bearer {self.key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        if request.path == "/metrics":
            return web.Response(text="")
        body = await request.json()
        return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> "KeyedReplica":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def keyed_replica():
    replica = KeyedReplica("upstream-secret").start()
    yield replica
    replica.stop()


def test_the_upstream_key_is_sent_on_probes_and_requests(keyed_replica, gateway, monkeypatch) -> None:
    gw = gateway([keyed_replica.url], upstream_api_key="upstream-secret",
                 api_keys=["client-key"], admin_api_keys=["admin-key"])

    def state() -> str | None:
        table = httpx.get(gw.url + "/admin/replicas", headers={"authorization": "Bearer admin-key"}, timeout=5).json()
        return {row["replica_id"]: row["state"] for row in table["replicas"]}.get(keyed_replica.url)

    # READY needs its models, which came from /v1/models: that needs the key.
    wait_until(lambda: state() == "READY", 20, "the keyed replica to be READY")
    resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT},
                      headers={"authorization": "Bearer client-key"}, timeout=30)
    assert resp.status_code == 200, resp.text
    sent = {path: auth for path, auth in keyed_replica.seen}
    assert sent["/v1/models"] == "Bearer upstream-secret"
    assert sent["/v1/chat/completions"] == "Bearer upstream-secret"  # never the client's own key
    assert all(auth != "Bearer client-key" for _, auth in keyed_replica.seen)
