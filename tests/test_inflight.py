"""The data plane's in-flight tracker, and how its counts reach the routing policies as data."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest

from routers import build_router, RoutingFacts
from serve_app.ingress.inflight import InflightLease, InflightTracker
from serve_app.ingress.local_view import LocalView
from routers.load import load_of
from serve_app.replicas import LoadSample, LoadUpdate, ReplicaState, ReplicaView, Snapshot


# -------------------------------------------------------------- InflightTracker


# Tests of `track` keep a reference to the scope object, so a missed release
# cannot be hidden by the lease's garbage-collection safety net.


def test_track_counts_and_releases_on_normal_exit() -> None:
    tracker = InflightTracker()
    outer, inner = tracker.track("a"), tracker.track("a")
    with outer:
        assert tracker.count("a") == 1
        with inner:
            assert tracker.count("a") == 2
        assert tracker.count("a") == 1
    assert tracker.count("a") == 0
    assert tracker.snapshot() == {}


def test_track_releases_on_exception() -> None:
    tracker = InflightTracker()
    scope = tracker.track("a")
    with pytest.raises(RuntimeError):
        with scope:
            assert tracker.count("a") == 1
            raise RuntimeError("upstream failed")
    assert tracker.count("a") == 0
    assert tracker.snapshot() == {}


@pytest.mark.asyncio
async def test_track_releases_on_cancellation() -> None:
    tracker = InflightTracker()
    entered = asyncio.Event()
    never = asyncio.Event()
    scope = tracker.track("a")

    async def handler() -> None:
        with scope:
            entered.set()
            await never.wait()

    task = asyncio.create_task(handler())
    await entered.wait()
    assert tracker.count("a") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tracker.count("a") == 0
    assert tracker.snapshot() == {}


@pytest.mark.asyncio
async def test_track_inside_async_generator_releases_on_aclose() -> None:
    tracker = InflightTracker()
    scope = tracker.track("a")

    async def body() -> AsyncIterator[int]:
        with scope:
            for i in range(10):
                yield i

    gen = body()
    assert await anext(gen) == 0
    assert tracker.count("a") == 1
    await gen.aclose()
    assert tracker.count("a") == 0


@pytest.mark.asyncio
async def test_lease_held_by_async_generator_releases_on_aclose() -> None:
    tracker = InflightTracker()

    async def body(lease: InflightLease) -> AsyncIterator[int]:
        try:
            for i in range(10):
                yield i
        finally:
            lease.release()

    # The test keeps its own reference, so only the generator's finally can release.
    lease = tracker.acquire("a")
    gen = body(lease)
    assert await anext(gen) == 0
    assert tracker.count("a") == 1
    await gen.aclose()
    assert lease.released
    assert tracker.count("a") == 0


def test_lease_release_is_idempotent() -> None:
    tracker = InflightTracker()
    first = tracker.acquire("a")
    second = tracker.acquire("a")
    assert tracker.count("a") == 2
    first.release()
    first.release()
    first.release()
    # A repeated release must not eat the other request's count.
    assert tracker.count("a") == 1
    second.release()
    assert tracker.count("a") == 0
    second.release()
    assert tracker.count("a") == 0
    assert tracker.snapshot() == {}


def test_unreleased_lease_releases_when_collected() -> None:
    tracker = InflightTracker()
    lease = tracker.acquire("a")
    assert tracker.count("a") == 1
    del lease
    gc.collect()
    assert tracker.count("a") == 0


def test_counts_never_go_negative() -> None:
    tracker = InflightTracker()
    assert tracker.count("never-seen") == 0
    lease = tracker.acquire("a")
    scope = tracker.track("a")
    with scope:
        lease.release()
        lease.release()
        assert tracker.count("a") == 1
    lease.release()
    assert tracker.count("a") == 0
    assert all(n > 0 for n in tracker.snapshot().values())
    assert tracker.snapshot() == {}


def test_forget_bounds_the_dict() -> None:
    tracker = InflightTracker()
    leases = {rid: tracker.acquire(rid) for rid in ("a", "b", "c")}
    assert tracker.snapshot() == {"a": 1, "b": 1, "c": 1}
    tracker.forget(["a", "z"])
    assert tracker.snapshot() == {"a": 1}
    assert tracker.count("b") == 0
    # "b" comes back under the same id; a late release of the old lease
    # must not touch the new count, nor drive anything negative.
    fresh = tracker.acquire("b")
    leases["b"].release()
    leases["c"].release()
    assert tracker.snapshot() == {"a": 1, "b": 1}
    fresh.release()
    leases["a"].release()
    assert tracker.snapshot() == {}
    assert len(tracker) == 0


def test_forget_keeps_present_replicas_counting() -> None:
    tracker = InflightTracker()
    one, two = tracker.track("a"), tracker.track("a")
    with one, two:
        tracker.forget(iter(["a"]))  # any iterable, consumed once
        assert tracker.count("a") == 2
    assert tracker.snapshot() == {}


# ------------------------------------------------ counts reach policies as data


def _view(*replica_ids: str, model: str = "m") -> LocalView:
    view = LocalView(wall=lambda: 1000.0)
    replicas = tuple(
        ReplicaView(rid, f"http://{rid}", (model,), ReplicaState.READY, "", 0.0, "static") for rid in replica_ids
    )
    view.apply(Snapshot(epoch="e", version=1, replicas=replicas, known_models=(model,)))
    return view


def _loads(version: int, scraped_at: float = 999.5, **running: int) -> LoadUpdate:
    return LoadUpdate("e", version, {rid: LoadSample(n, 0, 0.0, scraped_at) for rid, n in running.items()})


def test_candidates_carry_this_replicas_inflight_counts() -> None:
    tracker = InflightTracker()
    view = _view("r0", "r1", "r2")
    view.apply_loads(_loads(1, r0=1, r1=1, r2=1), tracker.count)
    leases = [tracker.acquire("r0"), tracker.acquire("r0"), tracker.acquire("r2")]
    cands = view.candidates("m", tracker.count)
    assert [(c.replica_id, c.inflight, c.running, c.load_age_s) for c in cands] == [
        ("r0", 2, 1, 0.5), ("r1", 0, 1, 0.5), ("r2", 1, 1, 0.5)
    ]
    # least_request sees them, each request counted once: r0 = 1 scraped + 2 opened since.
    assert [load_of(c) for c in cands] == [3, 1, 2]
    assert build_router("least_request").choose(RoutingFacts(model="m"), cands)[0].replica_id == "r1"
    # A new scrape that already counts r0's two requests does not count them again.
    view.apply_loads(_loads(2, scraped_at=999.9, r0=3, r1=1, r2=2), tracker.count)
    assert [load_of(c) for c in view.candidates("m", tracker.count)] == [3, 1, 2]
    # A round whose r0 sample is the same scrape keeps r0's reference: a request r0
    # finished here since is taken off the scraped figure.
    leases.pop(0).release()
    view.apply_loads(_loads(3, scraped_at=999.9, r0=3, r1=1, r2=2), tracker.count)
    assert [load_of(c) for c in view.candidates("m", tracker.count)] == [2, 1, 2]
    for lease in leases:
        lease.release()
    assert [c.inflight for c in view.candidates("m", tracker.count)] == [0, 0, 0]


def test_candidates_leave_out_locally_ejected_replicas() -> None:
    view = _view("r0", "r1")
    view.eject_locally("r0", 60.0)
    assert [c.replica_id for c in view.candidates("m")] == ["r1"]
