"""When Serve replaces a gateway replica, the streams it is serving run to the end."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support import wait_for_event, wait_until

pytestmark = pytest.mark.timeout(180)

MODEL = "sim-model"
TOKENS = 300


def test_streams_finish_while_the_gateway_replica_is_replaced(simulators, gateway) -> None:
    (sim,) = simulators(1, "--itl", "0.05")  # TOKENS x 50 ms: a stream of about 15 s
    gw = gateway([sim.url])
    gw.wait_states({sim.url: "READY"})
    old_ingress = gw.table()["ingress_replica"]
    first_chunk = threading.Event()

    def stream() -> bytes:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": TOKENS,
                   "stream": True, "ignore_eos": True}
        received: list[bytes] = []
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=payload, timeout=60) as resp:
            assert resp.status_code == 200, resp.read()
            assert resp.headers["x-gateway-replica"] == sim.url
            for chunk in resp.iter_raw():
                received.append(chunk)
                first_chunk.set()
        return b"".join(received)

    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(stream)
        wait_for_event(first_chunk, reader, 30, "the first chunk of the stream")
        assert sim.stats()["running"] == 1  # the stream is under way when the replacement starts
        # A config change: Serve starts a new gateway replica and gracefully stops the old one,
        # which is in the middle of our stream. serve.run returns only once the deployment is
        # healthy, which Serve counts only when no replica is still STOPPING: the old one is gone.
        gateway([sim.url], retry_after_s=3)
        # So the old replica outlived the stream it was serving: by now the simulator had sent
        # the whole answer, and nobody gave up on it half-way.
        stats = sim.stats()
        assert (stats["completed_total"], stats["aborted_total"]) == (1, 0), f"the old replica did not wait for its stream: {stats}"
        body = reader.result(timeout=60)
    new_ingress = wait_until(lambda: gw.table().get("ingress_replica"), 30, "the new gateway replica's view")
    assert new_ingress != old_ingress
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in body
    assert body.count(b'"delta"') >= TOKENS  # every token arrived
