"""The replica table's state machine, driven by a fake clock (pure logic, no I/O)."""

from __future__ import annotations

import pytest

from serve_app.replicas import DiscoveryStatus, Endpoint, ReplicaState
from serve_app.control.table import ReplicaTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> ReplicaTable:
    return ReplicaTable(epoch="e1", ejection_base_s=2.0, ejection_max_s=16.0, clock=clock)


def ep(rid: str = "a", state: ReplicaState = ReplicaState.READY, models: tuple[str, ...] = ("m",), url: str | None = None) -> Endpoint:
    return Endpoint(replica_id=rid, url=url or f"http://{rid}:8000", models=models, state=state)


def test_new_replica_is_pending_until_probed(table: ReplicaTable) -> None:
    table.upsert(ep())
    assert table.state("a") is ReplicaState.PENDING
    table.probe_result("a", ok=True)
    assert table.state("a") is ReplicaState.READY


def test_starting_replica_that_refuses_stays_pending_not_ejected(table: ReplicaTable) -> None:
    table.upsert(ep())
    table.probe_result("a", ok=False, error="connection refused")
    assert table.state("a") is ReplicaState.PENDING
    assert "connection refused" in table.snapshot().replicas[0].reason


def test_models_learnt_from_probe_when_source_has_none(table: ReplicaTable) -> None:
    table.upsert(ep(models=()))
    table.probe_result("a", ok=True)
    assert table.state("a") is ReplicaState.PENDING  # can't route without knowing the model
    table.probe_result("a", ok=True, models=["llama"])
    assert table.state("a") is ReplicaState.READY
    assert table.snapshot().replicas[0].models == ("llama",)
    assert "llama" in table.snapshot().known_models


def test_draining_from_source_wins_over_probe(table: ReplicaTable) -> None:
    table.upsert(ep())
    table.probe_result("a", ok=True)
    table.upsert(ep(state=ReplicaState.DRAINING))
    assert table.state("a") is ReplicaState.DRAINING
    table.probe_result("a", ok=True)
    assert table.state("a") is ReplicaState.DRAINING


def test_failure_report_ejects_with_exponential_backoff(table: ReplicaTable, clock: Clock) -> None:
    table.upsert(ep())
    table.probe_result("a", ok=True)
    table.report_failure("a", "connect_failed")
    assert table.state("a") is ReplicaState.EJECTED
    clock.now += 1.0
    table.probe_result("a", ok=True)  # backoff (2 s) not over yet
    assert table.state("a") is ReplicaState.EJECTED
    clock.now += 1.5
    table.probe_result("a", ok=True)
    assert table.state("a") is ReplicaState.READY
    table.report_failure("a", "again")  # second ejection soon after: 4 s
    clock.now += 3.0
    table.probe_result("a", ok=True)
    assert table.state("a") is ReplicaState.EJECTED
    clock.now += 1.5
    table.probe_result("a", ok=True)
    assert table.state("a") is ReplicaState.READY


def test_dead_replica_comes_back_after_base_backoff_however_long_it_was_down(table: ReplicaTable, clock: Clock) -> None:
    table.upsert(ep())
    table.probe_result("a", ok=True)
    table.probe_result("a", ok=False, error="refused")
    assert table.state("a") is ReplicaState.EJECTED
    for _ in range(20):  # down for a long time: failing probes must not stretch the backoff
        clock.now += 2.0
        table.probe_result("a", ok=False, error="refused")
    clock.now += 2.0
    table.probe_result("a", ok=True)
    assert table.state("a") is ReplicaState.READY


def test_burst_of_reports_does_not_stretch_ejection(table: ReplicaTable, clock: Clock) -> None:
    table.upsert(ep())
    table.probe_result("a", ok=True)
    for _ in range(10):
        table.report_failure("a", "reset")
    clock.now += 2.1
    table.probe_result("a", ok=True)
    assert table.state("a") is ReplicaState.READY


def test_replace_all_removes_ghosts(table: ReplicaTable) -> None:
    table.upsert(ep("a"))
    table.upsert(ep("b"))
    table.replace_all([ep("b"), ep("c")])
    assert sorted(table.replica_ids()) == ["b", "c"]


def test_new_address_is_a_new_process(table: ReplicaTable) -> None:
    table.upsert(ep(url="http://10.0.0.1:8000"))
    table.probe_result("a", ok=True)
    table.upsert(ep(url="http://10.0.0.2:8000"))
    assert table.state("a") is ReplicaState.PENDING


def test_version_moves_only_on_visible_change(table: ReplicaTable) -> None:
    table.upsert(ep())
    table.probe_result("a", ok=True)
    version = table.version
    table.probe_result("a", ok=True)
    table.upsert(ep())
    assert table.version == version
    table.upsert(ep("b"))
    assert table.version == version + 1


def test_listener_called_on_change_and_snapshot_cached(table: ReplicaTable) -> None:
    calls = []
    table.add_listener(lambda: calls.append(table.version))
    table.upsert(ep())
    first = table.snapshot()
    assert table.snapshot() is first
    table.probe_result("a", ok=True)
    assert calls and table.snapshot() is not first


def test_known_models_survive_replica_removal(table: ReplicaTable) -> None:
    table.upsert(ep(models=("m",)))
    table.remove("a")
    assert table.snapshot().replicas == ()
    assert "m" in table.snapshot().known_models


def test_discovery_status_published(table: ReplicaTable) -> None:
    table.set_discovery_status(DiscoveryStatus(synced=True, stale_since=5.0, message="down"))
    snap = table.snapshot()
    assert snap.discovery.stale_since == 5.0 and snap.discovery.synced


# -- an ingress replica's copy: what it accepts -----------------------------------------------


def _snapshot(epoch: str, version: int, views: tuple, discovery: DiscoveryStatus) -> "Snapshot":
    from serve_app.replicas import Snapshot

    return Snapshot(epoch=epoch, version=version, replicas=views, known_models=("m",) if views else (), discovery=discovery)


def test_ingress_never_swaps_a_synced_view_for_an_unsynced_empty_one(table: ReplicaTable) -> None:
    from serve_app.ingress.local_view import LocalView

    table.upsert(ep())
    table.probe_result("a", ok=True)
    table.set_discovery_status(DiscoveryStatus(synced=True, message="watching 1 pod(s)"))
    synced = table.snapshot()
    view = LocalView()
    # A fresh ingress takes what it gets, even unsynced: it has nothing better.
    unsynced = _snapshot("e2", 3, (), DiscoveryStatus(synced=False, stale_since=50.0, message="Kubernetes API unreachable: x"))
    assert view.apply(unsynced) is True
    assert view.discovery_doubt() == ("discovery_not_synced", "replica discovery has not synced yet: Kubernetes API unreachable: x")
    assert view.apply(synced) is True
    assert view.discovery_doubt() is None and view.is_known("m")

    # A restarted actor that cannot list publishes a new epoch with nothing in it: refused.
    assert view.apply(unsynced) is False
    assert view.snapshot.epoch == "e1" and view.is_known("m") and view.candidates("m")
    assert view.snapshot.discovery.synced and view.snapshot.discovery.stale_since == 50.0
    assert "Kubernetes API unreachable: x" in view.snapshot.discovery.message
    code, detail = view.discovery_doubt()
    assert code == "discovery_stale" and "unreachable" in detail

    # The new actor lists (even an empty list is the truth once it is a list): accepted.
    listed = _snapshot("e2", 4, (), DiscoveryStatus(synced=True, message="watching 0 pod(s)"))
    assert view.apply(listed) is True
    assert view.snapshot.epoch == "e2" and not view.is_known("m") and view.discovery_doubt() is None
