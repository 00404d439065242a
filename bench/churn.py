"""Churn benchmark: the same OpenAI-SDK load with no churn, a rolling update, and SIGKILLs.

    python bench/churn.py [--seconds 30] [--concurrency 16]

Prints, for each phase measured in one run: requests, ok, failed (before the first byte),
cut (stream ended with an error event), cut silently, p99 latency, and p99 relative to
the no-churn phase. The churn loops are shared with tests/test_churn.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.openai_load import LoadReport, run_load  # noqa: E402
from vllm_sim.testing import SimulatorProcess, free_port  # noqa: E402

MODEL = "sim-model"
SIM_ARGS = ["--model", MODEL, "--ttft", "0.02", "--itl", "0.01", "--shutdown-mode", "drain", "--drain-timeout", "20"]


class BackgroundLoad:
    """The load runs in its own thread and event loop while the caller churns replicas."""

    def __init__(self, url: str, duration_s: float, concurrency: int = 16) -> None:
        self.report: LoadReport | None = None
        self.error: BaseException | None = None
        self._args = (url, duration_s, concurrency)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        url, duration_s, concurrency = self._args
        try:
            self.report = asyncio.run(
                run_load(url, MODEL, duration_s=duration_s, concurrency=concurrency, max_tokens=24)
            )
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


def rolling_update(
    active: list[SimulatorProcess],
    spares: list[SimulatorProcess],
    wait_routable: Callable[[str], None],
    keep_going: Callable[[], bool],
) -> int:
    """Replace replicas one by one like a rolling update: new one ready, old one drains and exits."""
    replaced = 0
    while keep_going():
        i = replaced % len(active)
        new, old = spares[i], active[i]
        new.start()
        new.wait_ready(timeout=30)
        wait_routable(new.url)
        old.send_signal(signal.SIGTERM)  # drain: finish in-flight, refuse new, exit
        old.wait(timeout=40)
        active[i], spares[i] = new, old
        replaced += 1
    return replaced


def abrupt_kills(
    sims: list[SimulatorProcess],
    wait_routable: Callable[[str], None],
    keep_going: Callable[[], bool],
) -> tuple[int, set[str]]:
    """SIGKILL one replica at a time (never all at once) while it has work; restart it.

    Returns how many kills happened and which replicas were killed."""
    killed: set[str] = set()
    kills = 0
    while keep_going():
        victim = sims[kills % len(sims)]
        _wait(lambda: victim.stats()["running"] > 0 or not keep_going(), 10)
        victim.kill()
        killed.add(victim.url)
        kills += 1
        victim.restart()
        wait_routable(victim.url)
    return kills, killed


def _wait(predicate: Callable[[], bool], timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)


def _row(name: str, report: LoadReport, base_p99: float) -> dict:
    return {
        "phase": name,
        "requests": report.started,
        "ok": report.count("ok"),
        "failed": report.count("failed"),
        "cut": report.count("cut"),
        "cut_silently": report.count("cut_silently"),
        "p99_ms": round(report.p99_latency_s() * 1000, 1),
        "p99_vs_no_churn": round(report.p99_latency_s() / base_p99, 2) if base_p99 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_from_config
    from serve_app.config import GatewayConfig

    active = [SimulatorProcess(SIM_ARGS).start() for _ in range(3)]
    spares = [SimulatorProcess(SIM_ARGS, port=free_port()) for _ in range(3)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        for sim in active:
            sim.wait_ready(timeout=30)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        urls = [s.url for s in active + spares]
        config = GatewayConfig.model_validate(
            {
                "discovery": {"kind": "static", "urls": urls, "models": {u: [MODEL] for u in urls}},
                "health": {"probe_interval_s": 0.5, "metrics_interval_s": 0.5, "ejection_base_s": 0.5},
            }
        )
        serve.run(build_from_config(config), name="gateway", route_prefix="/")
        base = f"http://127.0.0.1:{port}"

        def wait_routable(url: str) -> None:
            def ready() -> bool:
                rows = httpx.get(base + "/admin/replicas", timeout=5).json()["replicas"]
                return any(r["replica_id"] == url and r["state"] == "READY" for r in rows)

            _wait(ready, 30)

        for sim in active:
            wait_routable(sim.url)
        rows = []
        with BackgroundLoad(base, args.seconds, args.concurrency) as load:
            pass
        baseline = load.result()
        rows.append(_row("no churn", baseline, baseline.p99_latency_s()))
        with BackgroundLoad(base, args.seconds, args.concurrency) as load:
            replaced = rolling_update(active, spares, wait_routable, load.running)
        rows.append({**_row("rolling update", load.result(), baseline.p99_latency_s()), "events": replaced})
        with BackgroundLoad(base, args.seconds, args.concurrency) as load:
            kills, _ = abrupt_kills(active, wait_routable, load.running)
        rows.append({**_row("SIGKILL + restart", load.result(), baseline.p99_latency_s()), "events": kills})
    finally:
        serve.shutdown()
        ray.shutdown()
        for sim in active + spares:
            sim.stop()

    cols = ["phase", "events", "requests", "ok", "failed", "cut", "cut_silently", "p99_ms", "p99_vs_no_churn"]
    print(f"churn benchmark: {args.concurrency} OpenAI SDK clients (half streaming), {args.seconds:.0f}s per phase")
    print(" | ".join(f"{c:>17}" for c in cols))
    for row in rows:
        print(" | ".join(f"{str(row.get(c)):>17}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
