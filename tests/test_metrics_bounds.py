"""/metrics stays bounded under churn (issue 9, item 7).

- the `replica` label: a vLLM replica's series go once it has been gone for
  `metrics.replica_series_ttl_s`, from the fleet aggregate first and from each ingress
  replica's registry a margin later;
- dead ingress replicas: their per-source entries leave the aggregate, while the fleet
  counters they contributed to never go down.
"""

from __future__ import annotations

import re

from serve_app.metrics import MetricsAggregator, RequestMetrics, render

TTL = 600.0


def series(text: str, name: str) -> dict[str, float]:
    return {labels: float(value) for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)}


def replicas_in(text: str) -> set[str]:
    return set(re.findall(r'replica="([^"]+)"', text))


def serve_one(metrics: RequestMetrics, replica: str, status: int | str = 200) -> None:
    metrics.started("m")
    metrics.finished("m", status, replica, 0.01)


def test_the_replica_label_is_bounded_under_pod_churn() -> None:
    now = [0.0]
    agg = MetricsAggregator(clock=lambda: now[0], replica_series_ttl_s=TTL)
    ingress = RequestMetrics()
    live: list[str] = []
    for generation in range(50):  # a rolling update every 60 s: 3 pods, each replaced
        live = [f"pod-{generation}-{i}" for i in range(3)]
        agg.replicas_live(live)
        for replica in live:
            serve_one(ingress, replica)
            ingress.stream_error("m", replica)
            serve_one(ingress, replica, "client_disconnected")
        ingress.forget_replicas(live, TTL + 60, now=now[0])
        agg.push("ingress-a", ingress.export())
        now[0] += 60.0
    agg.replicas_live(live)
    text = render(agg.merged()).decode()
    # 150 pods went through; only those gone for less than the TTL (10 generations) remain.
    assert len(replicas_in(text)) <= 3 * (TTL / 60 + 2)
    assert set(live) <= replicas_in(text)
    # The ingress registry is bounded the same way (a minute later).
    own = render([m for m in ingress.registry.collect()]).decode()
    assert len(replicas_in(own)) <= 3 * ((TTL + 60) / 60 + 2)
    assert "pod-0-0" not in own and "pod-0-0" not in text


def test_a_series_leaves_the_aggregate_before_any_ingress_registry_drops_it() -> None:
    now = [0.0]
    agg = MetricsAggregator(clock=lambda: now[0], replica_series_ttl_s=TTL)
    a, b = RequestMetrics(), RequestMetrics()
    agg.replicas_live(["old", "new"])
    for m in (a, b):
        serve_one(m, "old")
        serve_one(m, "new")
    previous: dict[str, float] = {}
    for _ in range(40):  # "old" leaves at t=0; both ingress replicas push every 30 s
        now[0] += 30.0
        agg.replicas_live(["new"])
        for source, m in (("a", a), ("b", b)):
            serve_one(m, "new")
            m.forget_replicas(["new"], TTL + 60, now=now[0])
            agg.push(source, m.export())
            figures = series(render(agg.merged()).decode(), "gateway_requests_total")
            for key, value in previous.items():  # a series never goes down while it is shown
                assert figures.get(key, value) >= value, (key, figures.get(key), value)
            previous = figures
    assert not any('replica="old"' in key for key in previous)
    assert previous['model="m",replica="new",status="200"'] == 82.0


def test_dead_ingress_replicas_leave_the_aggregate_and_its_sums_never_go_down() -> None:
    now = [0.0]
    agg = MetricsAggregator(clock=lambda: now[0], retire_after_s=300.0)
    total = 0
    for i in range(100):  # ingress replicas come and go: each serves 2 requests, then dies
        ingress = RequestMetrics()
        serve_one(ingress, "r1")
        serve_one(ingress, "r1")
        agg.push(f"ingress-{i}", ingress.export())
        total += 2
        now[0] += 60.0
        figures = series(render(agg.merged()).decode(), "gateway_requests_total")
        assert figures['model="m",replica="r1",status="200"'] == total
    assert agg.sources <= 6  # only the ones heard from in the last 300 s are kept one by one
    # A retired replica that pushes again (it was only cut off) is not counted twice.
    agg.push("ingress-0", ingress.export())
    figures = series(render(agg.merged()).decode(), "gateway_requests_total")
    assert figures['model="m",replica="r1",status="200"'] == total
