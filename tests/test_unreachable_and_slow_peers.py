"""Peers that never answer, answer too much, or send too slowly (issue 9, item 6).

- a black-holed pod IP (SYNs go unanswered: a connect timeout) is a connect failure: another
  replica is tried, and with none left the client gets a 503, never the internal address;
- a non-streamed answer larger than `max_response_bytes` is not read into memory whole;
- a client that sends its body slowly gets a 408 after `timeouts.request_body_s`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import httpx
import pytest

from tests.conftest import FAST_HEALTH
from tests.support import wait_until

pytestmark = pytest.mark.timeout(180)

MODEL = "sim-model"
CHAT = [{"role": "user", "content": "Say something deterministic."}]


class BlackHoleProxy:
    """A TCP forwarder to a real replica that can turn into a black hole.

    After `black_hole()` it no longer accepts, its (one-deep) accept queue is full, and
    Linux drops further SYNs: a new connection neither succeeds nor is refused, exactly
    what a client sees of a pod IP that has gone away behind a silent network.
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._accepting = True
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, name="black-hole-proxy", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._accepting:
                    return
                try:
                    client, _ = self._listener.accept()
                except (TimeoutError, OSError):
                    continue
                upstream = socket.create_connection(("127.0.0.1", self._target))
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def black_hole(self) -> None:
        with self._lock:  # the accept loop is not inside accept() while this holds the lock
            self._accepting = False
            for sock in self._sockets:  # established connections die too (the pod is gone)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()
        self._thread.join(timeout=5)
        # Fill the accept queue; the first connection that does not complete proves it full.
        for _ in range(16):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.3)
            self._sockets.append(filler)
            try:
                filler.connect(("127.0.0.1", self.port))
            except (TimeoutError, OSError):
                return
        raise AssertionError("could not fill the accept queue")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for sock in self._sockets:
                sock.close()
        self._listener.close()


@pytest.fixture
def proxies():
    made: list[BlackHoleProxy] = []

    def make(target_port: int) -> BlackHoleProxy:
        proxy = BlackHoleProxy(target_port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def chat(gw, max_tokens: int = 4, stream: bool = False) -> httpx.Response:
    payload = {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}
    return httpx.post(gw.url + "/v1/chat/completions", json=payload, timeout=60)


def test_a_black_holed_replica_is_a_connect_failure_and_its_address_stays_inside(simulators, gateway, proxies) -> None:
    (sim,) = simulators(1)
    proxy = proxies(sim.port)
    # Probes far apart: the table still says READY when the request meets the black hole.
    gw = gateway([proxy.url], models={proxy.url: [MODEL]}, timeouts={"connect_s": 0.5},
                 health={**FAST_HEALTH, "probe_interval_s": 600, "ejection_base_s": 120})
    gw.wait_states({proxy.url: "READY"})
    assert chat(gw).status_code == 200
    proxy.black_hole()
    resp = chat(gw)
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "no_ready_replica" and resp.headers.get("retry-after")
    assert str(proxy.port) not in resp.text and "127.0.0.1" not in resp.text


def test_a_black_holed_replica_is_passed_over_for_another(simulators, gateway, proxies) -> None:
    sims = simulators(2)
    holed = proxies(sims[0].port)
    good = sims[1].url
    gw = gateway([holed.url, good], router="round_robin", models={holed.url: [MODEL], good: [MODEL]},
                 timeouts={"connect_s": 0.5}, health={**FAST_HEALTH, "probe_interval_s": 600, "ejection_base_s": 120})
    gw.wait_states({holed.url: "READY", good: "READY"})
    holed.black_hole()
    attempts = []
    for _ in range(4):
        resp = chat(gw)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-gateway-replica"] == good
        attempts.append(resp.headers["x-gateway-attempts"])
    assert "2" in attempts  # the black hole was tried, failed to connect, and the next one served
    gw.wait_states({holed.url: "EJECTED"})


def test_non_streamed_answers_are_capped_streams_are_not(simulators, gateway) -> None:
    (sim,) = simulators(1)
    gw = gateway([sim.url], max_response_bytes=4096, health={**FAST_HEALTH, "ejection_base_s": 120})
    gw.wait_states({sim.url: "READY"})
    small = chat(gw, 4)
    assert small.status_code == 200 and len(small.content) < 4096
    big = chat(gw, 1000)  # a few KB of JSON
    assert big.status_code == 502, big.text
    assert big.json()["error"]["code"] == "upstream_response_too_large"
    assert big.headers["x-gateway-attempts"] == "1"  # the request's size, not the replica's fault
    stream = chat(gw, 1000, stream=True)  # passed through as it comes: no cap
    assert stream.status_code == 200 and len(stream.content) > 4096
    assert stream.content.endswith(b"data: [DONE]\n\n")
    assert chat(gw, 4).status_code == 200  # not ejected
    assert gw.states() == {sim.url: "READY"}


def test_a_client_sending_its_body_slowly_gets_408(simulators, gateway) -> None:
    (sim,) = simulators(1)
    gw = gateway([sim.url], timeouts={"request_body_s": 1.0})
    gw.wait_states({sim.url: "READY"})
    host, port = httpx.URL(gw.url).host, httpx.URL(gw.url).port
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 2}).encode()
    with socket.create_connection((host, port), timeout=30) as sock:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body[:10])  # ... and the rest never comes
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.split()[1] == b"408", received
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    # The slot is free again: the gateway serves the next request.
    assert chat(gw).status_code == 200
