"""Replicas come and go under sustained load; clients must not notice (zero errors through churn)."""

from __future__ import annotations

import pytest

from bench.churn import SIM_ARGS, BackgroundLoad, abrupt_kills, rolling_update
from bench.openai_load import LoadReport
from vllm_sim.testing import SimulatorProcess, free_port

pytestmark = pytest.mark.timeout(240)

MODEL = "sim-model"
LOAD_S = 30.0


def _describe_failures(report: LoadReport) -> str:
    bad = [o for o in report.outcomes if o.kind != "ok"]
    return report.summary() + "".join(f"\n  {o.kind} stream={o.stream} replica={o.replica}: {o.error}" for o in bad[:10])


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
        with BackgroundLoad(gw.url, LOAD_S) as load:
            replaced = rolling_update(active, spares, lambda url: gw.wait_states({url: "READY"}), load.running)
        report = load.result()
        assert replaced >= 3, f"only {replaced} replacements happened during the load"
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
        with BackgroundLoad(gw.url, LOAD_S) as load:
            kills, killed = abrupt_kills(sims, lambda url: gw.wait_states({url: "READY"}, timeout=30), load.running)
        report = load.result()
        assert kills >= 3
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
        with BackgroundLoad(gw.url, 15.0) as load:
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        report = load.result()
        assert report.count("ok") == report.started > 50, _describe_failures(report)
        after = gw.table()
        assert after["epoch"] != before["epoch"]  # a new actor instance ...
        assert {r["replica_id"]: r["state"] for r in after["replicas"]} == {p.url: "READY" for p in sims}  # ... same view
    finally:
        for proc in sims:
            proc.stop()
