"""The health actor's loops, run in-process (the Serve wiring is covered by the e2e tests)."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_app.config import GatewayConfig
from serve_app.control import ReplicaHealth
from serve_app.replicas import ReplicaState

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_full_probe_rounds_are_not_starved_by_quick_rounds(simulators) -> None:
    a, b = simulators(2)
    config = GatewayConfig.model_validate(
        {"discovery": {"kind": "static", "urls": [a.url, b.url]}, "health": {"probe_interval_s": 0.5}}
    )
    cls = ReplicaHealth.func_or_class
    actor = cls.__new__(cls)
    await actor.__init__(config)
    try:
        states = lambda: {v.replica_id: v.state for v in actor.current().replicas}  # noqa: E731
        await _until(lambda: set(states().values()) == {ReplicaState.READY}, 20, "both READY")
        stop = asyncio.Event()

        async def keep_asking_for_quick_rounds() -> None:  # like pods turning Ready in a rollout
            while not stop.is_set():
                actor.report_failure("not-a-replica", "noise")
                await asyncio.sleep(0.05)

        noise = asyncio.create_task(keep_asking_for_quick_rounds())
        await asyncio.sleep(1.0)  # let the noise run for two probe intervals before the kill
        a.kill()  # only a full round's probe can notice: no traffic reports it
        await _until(lambda: states()[a.url] is ReplicaState.EJECTED, 5, "the dead replica to be ejected")
        assert states()[b.url] is ReplicaState.READY
        stop.set()
        await noise
    finally:
        await actor.__del__()
