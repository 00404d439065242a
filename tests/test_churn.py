"""Replicas come and go under sustained load; clients must not notice (issue: zero errors through churn)."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from bench.openai_load import LoadReport, run_load
from tests.support import wait_until
from vllm_sim.testing import SimulatorProcess, free_port

pytestmark = pytest.mark.timeout(240)

MODEL = "sim-model"
LOAD_S = 30.0
SIM_ARGS = ["--model", MODEL, "--ttft", "0.02", "--itl", "0.01", "--shutdown-mode", "drain", "--drain-timeout", "20"]


class BackgroundLoad:
    """The load runs in its own thread and event loop while the test churns replicas."""

    def __init__(self, url: str, duration_s: float) -> None:
        self.report: LoadReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url, duration_s), daemon=True)

    def _run(self, url: str, duration_s: float) -> None:
        try:
            self.report = asyncio.run(run_load(url, MODEL, duration_s=duration_s, concurrency=16, max_tokens=24))
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def __enter__(self) -> "BackgroundLoad":
        self._thread.start()
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=120)

    def result(self) -> LoadReport:
        assert not self._thread.is_alive(), "load did not stop"
        assert self.error is None, f"load generator crashed: {self.error!r}"
        assert self.report is not None
        return self.report


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
        replaced = 0
        with BackgroundLoad(gw.url, LOAD_S) as load:
            while load.running():
                i = replaced % 3
                new, old = spares[i], active[i]
                new.start()
                new.wait_ready(timeout=30)
                gw.wait_states({new.url: "READY"})
                old.send_signal(signal.SIGTERM)  # drain: finish in-flight, refuse new, exit
                old.wait(timeout=40)
                active[i], spares[i] = new, old
                replaced += 1
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
        killed: set[str] = set()
        kills = 0
        with BackgroundLoad(gw.url, LOAD_S) as load:
            while load.running():
                victim = sims[kills % 3]
                wait_until(lambda: victim.stats()["running"] > 0 or not load.running(), 10, "work on the victim")
                victim.kill()  # SIGKILL, never more than one down at a time
                killed.add(victim.url)
                kills += 1
                victim.restart()
                gw.wait_states({victim.url: "READY"}, timeout=30)
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
