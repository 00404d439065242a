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
    # Record every probe round as it ends: (when it started, replicas probed). With both
    # replicas READY a quick round probes nobody and a full round probes both.
    rounds: list[tuple[float, int]] = []
    probe_all = actor._probe_all

    async def recording_probe_all(replica_ids, refresh_models):
        began = time.monotonic()
        await probe_all(replica_ids, refresh_models)
        rounds.append((began, len(replica_ids)))

    actor._probe_all = recording_probe_all
    try:
        states = lambda: {v.replica_id: v.state for v in actor.current().replicas}  # noqa: E731
        await _until(lambda: set(states().values()) == {ReplicaState.READY}, 20, "both READY")
        stop = asyncio.Event()
        noise_since = time.monotonic()

        async def keep_asking_for_quick_rounds() -> None:  # like pods turning Ready in a rollout
            while not stop.is_set():
                actor.report_failure("not-a-replica", "noise")
                await asyncio.sleep(0.05)

        noise = asyncio.create_task(keep_asking_for_quick_rounds())

        def rounds_since(t: float) -> tuple[int, int]:
            quick = sum(1 for began, n in rounds if began >= t and n == 0)
            full = sum(1 for began, n in rounds if began >= t and n == 2)
            return quick, full

        # The noise is really driving quick rounds, and full rounds still come in between.
        await _until(lambda: rounds_since(noise_since)[0] >= 5 and rounds_since(noise_since)[1] >= 2, 20,
                     "quick rounds from the noise, and two full rounds among them")
        a.kill()  # only a full round's probe can notice: no traffic reports it
        killed_at = time.monotonic()
        # The first full round that starts after the kill must find it dead.
        await _until(lambda: rounds_since(killed_at)[1] >= 1, 20, "a full probe round after the kill")
        assert not noise.done(), "the noise stopped early"
        assert states()[a.url] is ReplicaState.EJECTED
        assert states()[b.url] is ReplicaState.READY
        stop.set()
        await noise
    finally:
        await actor.__del__()
