"""Replicas come and go under sustained load; clients must not notice (zero errors through churn)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.churn import SIM_ARGS, abrupt_kills, rolling_update
from bench.openai_load import LoadReport
from tests.support import SustainedLoad, wait_until
from vllm_sim.testing import SimulatorProcess, free_port

pytestmark = pytest.mark.timeout(240)

MODEL = "sim-model"
LOAD_S = 30.0  # the least load a churn test runs; it runs longer until its churn is done
CHURN = 3  # replicas replaced or killed, at least, under that load


def _describe_failures(report: LoadReport) -> str:
    bad = [o for o in report.outcomes if o.kind != "ok"]
    return report.summary() + "".join(f"\n  {o.kind} stream={o.stream} replica={o.replica}: {o.error}" for o in bad[:10])


class Churn:
    """Counts churn steps (each ends with one `wait_routable`) and says when to stop.

    The churn loops of bench/churn.py ask `keep_going()` between steps: keep going until
    at least CHURN steps are done *and* the load has run LOAD_S, so a slow machine gets a
    longer test, never a test with fewer replacements.
    """

    def __init__(self, load: SustainedLoad, wait_routable: Callable[[str], None]) -> None:
        self.load = load
        self.done = 0
        self._wait_routable = wait_routable

    def wait_routable(self, url: str) -> None:
        self._wait_routable(url)
        self.done += 1

    def keep_going(self) -> bool:
        return self.done < CHURN or self.load.elapsed() < LOAD_S


def test_rolling_update_loses_nothing(serve_http, gateway) -> None:
    """Each replica is replaced the way a rolling update does it: new one ready, old one drains, exits."""
    active = [SimulatorProcess(SIM_ARGS).start() for _ in range(3)]
    spares = [SimulatorProcess(SIM_ARGS, port=free_port()) for _ in range(3)]
    try:
        for proc in active:
            proc.wait_ready(timeout=30)
        urls = [p.url for p in active + spares]
        gw = gateway(urls, models={url: [MODEL] for url in urls}, router="least_request")
        gw.wait_states({p.url: "READY" for p in active})
        with SustainedLoad(gw.url) as load:
            churn = Churn(load, lambda url: gw.wait_states({url: "READY"}))
            replaced = rolling_update(active, spares, churn.wait_routable, churn.keep_going)
        report = load.result()
        assert replaced >= CHURN, f"only {replaced} replacements happened during the load"
        assert report.started == len(report.outcomes) > 100  # every request accounted for
        assert report.count("ok") == report.started, _describe_failures(report)
    finally:
        for proc in active + spares:
            proc.stop()


def test_abrupt_kills_fail_only_streams_that_were_running_there(serve_http, gateway) -> None:
    sims = [SimulatorProcess(SIM_ARGS).start() for _ in range(3)]
    try:
        for proc in sims:
            proc.wait_ready(timeout=30)
        gw = gateway([p.url for p in sims], router="least_request")
        gw.wait_states({p.url: "READY" for p in sims})
        with SustainedLoad(gw.url) as load:
            churn = Churn(load, lambda url: gw.wait_states({url: "READY"}, timeout=30))
            kills, killed = abrupt_kills(sims, churn.wait_routable, churn.keep_going)
        report = load.result()
        assert kills >= CHURN
        assert report.started == len(report.outcomes) > 100
        not_started = [o for o in report.outcomes if o.kind in ("failed", "cut_silently")]
        assert not not_started, _describe_failures(report)
        cut = [o for o in report.outcomes if o.kind == "cut"]
        assert all(o.stream and o.replica in killed for o in cut), _describe_failures(report)
        assert report.count("ok") + len(cut) == report.started
    finally:
        for proc in sims:
            proc.stop()


def test_health_actor_killed_under_load(serve_http, gateway) -> None:
    """Ingress replicas keep serving on their last view; the actor comes back with the same view."""
    import ray

    sims = [SimulatorProcess(SIM_ARGS).start() for _ in range(2)]
    try:
        for proc in sims:
            proc.wait_ready(timeout=30)
        gw = gateway([p.url for p in sims], ingress_replicas=2)
        gw.wait_states({p.url: "READY" for p in sims})
        before = gw.table()
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ReplicaHealth" in a["name"]]
        assert len(names) == 1
        after: dict[str, dict] = {}  # ingress replica -> its first table from the new actor

        def both_ingress_replicas_see_a_new_actor() -> bool:
            table = gw.table()
            if table["epoch"] != before["epoch"]:
                after.setdefault(table["ingress_replica"], table)
            return len(after) == 2

        with SustainedLoad(gw.url) as load:
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            # Serve starts a new actor; the load runs until both ingress replicas have its view.
            wait_until(both_ingress_replicas_see_a_new_actor, 90, "both ingress replicas to get the new actor's view")
            wait_until(lambda: load.elapsed() >= 15.0, 30, "15 s of load")
        report = load.result()
        assert report.count("ok") == report.started > 50, _describe_failures(report)
        for table in after.values():  # a new actor instance (new epoch), with the same view from its first snapshot
            assert {r["replica_id"]: r["state"] for r in table["replicas"]} == {p.url: "READY" for p in sims}
    finally:
        for proc in sims:
            proc.stop()
