"""When Serve replaces a gateway replica, the streams it is serving run to the end."""

from __future__ import annotations

import threading
import time

import httpx
import pytest


pytestmark = pytest.mark.timeout(180)

MODEL = "sim-model"


def test_streams_finish_while_the_gateway_replica_is_replaced(simulators, gateway) -> None:
    (sim,) = simulators(1, "--itl", "0.05")
    gw = gateway([sim.url])
    gw.wait_states({sim.url: "READY"})
    old_ingress = gw.table()["ingress_replica"]
    received: list[bytes] = []
    first_chunk = threading.Event()
    stream_ended_at: list[float] = []

    def stream() -> None:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 300,
                   "stream": True, "ignore_eos": True}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=payload, timeout=60) as resp:
            for chunk in resp.iter_raw():
                received.append(chunk)
                first_chunk.set()
        stream_ended_at.append(time.monotonic())

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(30)
    # A config change: Serve starts a new gateway replica and gracefully stops the old one,
    # which is in the middle of our stream.
    gateway([sim.url], retry_after_s=3)
    redeployed_at = time.monotonic()
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert gw.table()["ingress_replica"] != old_ingress
    assert stream_ended_at and stream_ended_at[0] <= redeployed_at + 0.5, "the old replica did not wait for its stream"
    body = b"".join(received)
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in body
    assert body.count(b'"delta"') >= 300  # every token arrived
