#!/usr/bin/env python
"""How long does a pod change take to reach the ingress replicas' local replica view?

Against a real kube-apiserver + etcd (controlplane/), a local Ray + Serve and the gateway
on Kubernetes discovery, with N vLLM pods already in the namespace (N = each of --scales),
this makes --events pod changes per scale, alternating

  ready       a NotReady pod is patched Ready (pods/status, as a kubelet would)
  terminate   a Ready pod is deleted with a grace period (it stays Terminating)

and times each from the moment the apiserver answered the API call to the moment every
ingress replica's LOCAL view (the table it routes on, what /admin/replicas returns) shows
the pod READY, resp. DRAINING. A ready transition includes the health actor's first
/health probe of the pod: the actor probes a pod the moment its source says READY, and only
then publishes it as READY; that probe is part of the measured path, and the breakdown
shows it separately.

How the ingress view is observed. Nothing in serve_app changes: the benchmark installs
small recorders in the running replicas through Ray's `__ray_call__` (a developer API
that runs a function on an actor), on each replica's user-code event loop:

  ingress replicas   wrap `LocalView.apply`: right after a snapshot is applied, the watched
                     pod's state is looked up (bisect on the sorted snapshot) and a change
                     is timestamped (wall clock) and sent to the benchmark as a UDP datagram
  ReplicaHealth      a table listener (first in line) timestamps every state change of the
                     watched pod; a wrapper of `endpoint_from_pod` in the discovery module
                     timestamps the moment the watch thread parsed the pod's event;
                     `_probe_all` and `Prober.load` are wrapped to time probe rounds and
                     /metrics scrapes (the actor's background load)
  every replica      an event-loop lag monitor (20 ms sleeps)

The recorders cost a dict lookup per table change and a bisect per applied snapshot; the
benchmark's own Ray calls to them (arm before an event, collect after) stay outside the
measured interval.

So the resolution is that of the clock (same host, same wall clock), not of a polling
interval; the benchmark only waits for the datagrams. `--http-poll` additionally polls
`/admin/replicas` through Serve's HTTP port as an independent observer (every
--poll-interval; the report gives the achieved poll period) and prints its figures next
to the recorders', which validates them (an HTTP observation can only be later).

Breakdown of each event (ms, from the apiserver's answer t_ack):
  watch     t_ack -> the actor's watch thread parsed the event (can be < 0: the watch
            event may overtake the API call's response)
  dispatch  watch thread -> the actor's event loop applied it to the table
  probe     (ready only) table saw the pod Ready -> first probe passed, row READY
  publish   row state changed -> the snapshot that carried it was built (long-poll wake-up
            and the O(n) snapshot build; for ready, mostly the wait for the ingress
            replicas to come back for more after the snapshot of the step before, pod
            Ready but not yet probed)
  deliver   snapshot built -> applied in the ingress replica (pickle, Ray transfer,
            unpickle, LocalView.apply); the slowest ingress replica
  ->actor   t_ack -> the actor's table shows the new state (watch+dispatch+probe)
  actor->ingress  that -> every ingress replica shows it (publish+deliver)
  1st       t_ack -> the first ingress replica shows it

The population stays constant: each scale starts with N pods (--ready-fraction Ready, the
rest Running but NotReady; all point at a few simulators on 127.0.0.2.. with the
`llm-gateway/port` label), and a terminated pod is force-deleted and re-created NotReady
(waited for, not measured) before the next event. Scales run in ascending order in one
namespace, adding pods.

    python bench/propagation.py --quick                    # scales 10,100; 20 events; ~0.5-1 min
    python bench/propagation.py                            # scales 10,100,1000; 200 events; ~3-5 min
    python bench/propagation.py --ingress-replicas 1 --json /tmp/prop.json
    python bench/propagation.py --quick --http-poll        # cross-check through HTTP

Everything started here (control plane, Ray, Serve, simulators) is stopped at the end,
on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import concurrent.futures
import json
import os
import platform
import random
import re
import select
import signal
import socket
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import fmt as cell, percentile, stop_serve_and_ray  # noqa: E402  (stdlib only; driver side only)

MODEL = "bench-model"
APP = "propagation"
NAMESPACE_PREFIX = "bench-prop"
POD_LABELS = {"app": "vllm", "llm-gateway/model": MODEL}
PORT_LABEL = "llm-gateway/port"
TERMINATION_GRACE_S = 600  # no kubelet: a terminated pod stays Terminating until we force-delete it
LAG_PERIOD_S = 0.02


def log(msg: str) -> None:
    print(f"[propagation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGTERM, turned into an exception so that the finally blocks run."""


# ======================================================================================
# Code that runs INSIDE the Serve replicas (shipped by value with cloudpickle through
# `actor.__ray_call__`). It reads serve_app's objects and wraps a few attributes on the
# running instances (plus `endpoint_from_pod` in the discovery module of the actor's
# process); serve_app's source is not touched.
# ======================================================================================


def _in_replica(actor: Any, fn: Any, *args: Any) -> Any:
    """Run `fn(user_object, *args)` on the replica's user-code event loop, return its result.

    `__ray_call__` runs in a thread of the replica actor's pool, while Serve runs the
    deployment's code on its own event loop (in a separate thread by default): hop over
    so the recorder never races the code it observes.
    """
    import asyncio as _asyncio

    wrapper = actor._replica_impl._user_callable_wrapper
    obj, loop = wrapper._callable, wrapper.event_loop
    try:
        running = _asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return fn(obj, *args)

    async def call() -> Any:
        return fn(obj, *args)

    return _asyncio.run_coroutine_threadsafe(call(), loop).result(60)


async def _lag_monitor(samples: collections.deque) -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(LAG_PERIOD_S)
        samples.append((time.time(), loop.time() - start - LAG_PERIOD_S))


def _lag_stats(samples: collections.deque, t0: float, t1: float) -> dict[str, Any]:
    # Runs in the replica, which cannot import bench.common: its own nearest ranks.
    lags = sorted(lag for t, lag in list(samples) if t0 <= t <= t1)
    if not lags:
        return {"samples": 0}
    return {
        "samples": len(lags),
        "p50_ms": 1000 * lags[len(lags) // 2],
        "p99_ms": 1000 * lags[min(len(lags) - 1, int(len(lags) * 0.99))],
        "max_ms": 1000 * lags[-1],
        "over_10ms": sum(lag > 0.010 for lag in lags),
    }


def _median_ms(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class _IngressRecorder:
    """Lives in an ingress replica: timestamps the watched pods' states as its view applies snapshots."""

    def __init__(self, gateway: Any, notify_port: int, who: str) -> None:
        self.who = who
        self.view = gateway._view
        self.watched: dict[str, tuple[str, bool]] = {}
        self.records: list[dict[str, Any]] = []
        self.applied: collections.deque = collections.deque(maxlen=20000)  # (t, version, created, rows)
        self.lags: collections.deque = collections.deque(maxlen=60000)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addr = ("127.0.0.1", notify_port)
        original = self.view.apply

        def apply(snapshot: Any) -> None:
            original(snapshot)
            t = time.time()
            self.applied.append((t, snapshot.version, snapshot.created, len(snapshot.replicas)))
            if self.watched:
                self._check(snapshot, t)

        self.view.apply = apply  # instance attribute: Gateway._poll_snapshots calls self._view.apply
        self.lag_task = asyncio.ensure_future(_lag_monitor(self.lags))

    @staticmethod
    def state_in(snapshot: Any, replica_id: str) -> tuple[str, bool]:
        if snapshot is None:
            return ("NONE", False)
        rows = snapshot.replicas  # sorted by replica_id
        i = bisect.bisect_left(rows, replica_id, key=lambda view: view.replica_id)
        if i < len(rows) and rows[i].replica_id == replica_id:
            return (rows[i].state.value, bool(rows[i].url))
        return ("ABSENT", False)

    def _check(self, snapshot: Any, t: float) -> None:
        for pod, last in list(self.watched.items()):
            now = self.state_in(snapshot, pod)
            if now != last:
                self.watched[pod] = now
                record = {
                    "t": t, "who": self.who, "pod": pod, "state": now[0], "url": now[1],
                    "version": snapshot.version, "created": snapshot.created,
                }
                self.records.append(record)
                try:
                    self.sock.sendto(json.dumps(record).encode(), self.addr)
                except OSError:
                    pass  # the benchmark pulls the records anyway

    def set_watch(self, pods: list[str]) -> dict[str, tuple[str, bool]]:
        self.records = [r for r in self.records if r["t"] > time.time() - 60]
        self.watched = {pod: self.state_in(self.view.snapshot, pod) for pod in pods}
        return dict(self.watched)


class _ActorRecorder:
    """Lives in the ReplicaHealth replica: watch-thread arrival, table changes, probe rounds."""

    def __init__(self, health: Any) -> None:
        self.health = health
        self.table = health._table
        self.watched: dict[str, tuple[str, str, bool]] = {}
        self.records: list[dict[str, Any]] = []
        self.watch_records: list[dict[str, Any]] = []
        self.probe_rounds: collections.deque = collections.deque(maxlen=20000)  # (t0, t1, n)
        self.versions: collections.deque = collections.deque(maxlen=200000)  # (t, version)
        self.lags: collections.deque = collections.deque(maxlen=60000)
        self.notes: list[str] = []
        # First in line, so the health actor's own listener (which scans every row to
        # decide whether to probe at once) is not counted as "table changed".
        self.table._listeners.insert(0, self._on_change)
        module = sys.modules.get("serve_app.control.discovery.kubernetes")
        if module is None or not hasattr(module, "endpoint_from_pod"):
            self.notes.append("discovery module not found: no watch-thread timestamps")
        else:
            original = module.endpoint_from_pod

            def endpoint_from_pod(pod: dict, config: Any) -> Any:
                endpoint = original(pod, config)
                watched = self.watched
                if watched:
                    meta = pod.get("metadata") or {}
                    pod_id = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
                    if pod_id in watched:
                        self.watch_records.append({
                            "t": time.time(), "pod": pod_id,
                            "endpoint_state": endpoint.state.value if endpoint is not None else "GONE",
                            "url": bool(endpoint is not None and endpoint.url),
                        })
                return endpoint

            module.endpoint_from_pod = endpoint_from_pod  # read at call time by KubernetesSource._watch
        original_probe_all = health._probe_all

        async def probe_all(replica_ids: list, refresh_models: bool = False) -> None:
            start = time.time()
            try:
                await original_probe_all(replica_ids, refresh_models=refresh_models)
            finally:
                self.probe_rounds.append((start, time.time(), len(replica_ids)))

        health._probe_all = probe_all  # instance attribute: _probe_loop calls self._probe_all
        self.scrapes: collections.deque = collections.deque(maxlen=200000)  # (t0, t1) of each /metrics scrape
        prober = health._prober
        original_load = prober.load

        async def load(url: str) -> Any:
            start = time.time()
            try:
                return await original_load(url)
            finally:
                self.scrapes.append((start, time.time()))

        prober.load = load  # instance attribute: _load_loop calls self._prober.load per READY replica
        self.lag_task = asyncio.ensure_future(_lag_monitor(self.lags))

    def state_of(self, pod: str) -> tuple[str, str, bool]:
        row = self.table._rows.get(pod)
        if row is None:
            return ("ABSENT", "ABSENT", False)
        return (row.endpoint.state.value, row.state.value, bool(row.endpoint.url))

    def _on_change(self) -> None:
        t = time.time()
        self.versions.append((t, self.table.version))
        for pod, last in list(self.watched.items()):
            now = self.state_of(pod)
            if now != last:
                self.watched[pod] = now
                self.records.append({
                    "t": t, "pod": pod, "endpoint_state": now[0], "state": now[1], "url": now[2],
                    "version": self.table.version,
                })

    def set_watch(self, pods: list[str]) -> dict[str, Any]:
        cutoff = time.time() - 60
        self.records = [r for r in self.records if r["t"] > cutoff]
        self.watch_records = [r for r in self.watch_records if r["t"] > cutoff]
        self.watched = {pod: self.state_of(pod) for pod in pods}
        return dict(self.watched)


def _install_ingress(gateway: Any, notify_port: int, who: str) -> str:
    if getattr(gateway, "_bench_recorder", None) is None:
        gateway._bench_recorder = _IngressRecorder(gateway, notify_port, who)
    return gateway._bench_recorder.who


def _install_actor(health: Any) -> list[str]:
    if getattr(health, "_bench_recorder", None) is None:
        health._bench_recorder = _ActorRecorder(health)
    return health._bench_recorder.notes


def _set_watch(obj: Any, pods: list[str]) -> dict[str, Any]:
    return obj._bench_recorder.set_watch(pods)


def _pull(obj: Any, since: float) -> dict[str, Any]:
    rec = obj._bench_recorder
    out = {"records": [r for r in list(rec.records) if r["t"] >= since]}
    if hasattr(rec, "watch_records"):  # the ReplicaHealth recorder
        out["watch_records"] = [r for r in list(rec.watch_records) if r["t"] >= since]
    return out


def _ingress_summary(gateway: Any) -> dict[str, Any]:
    snapshot = gateway._view.snapshot
    if snapshot is None:
        return {"rows": 0, "states": {}, "version": None}
    return {
        "rows": len(snapshot.replicas),
        "states": dict(collections.Counter(view.state.value for view in snapshot.replicas)),
        "version": snapshot.version,
    }


def _actor_summary(health: Any) -> dict[str, Any]:
    table = health._table
    return {
        "rows": len(table._rows),
        "states": dict(collections.Counter(row.state.value for row in table._rows.values())),
        "version": table.version,
    }


def _actor_costs(health: Any, reps: int) -> dict[str, Any]:
    """What the health actor pays per table change / per publication at the current size."""
    import pickle

    from ray import cloudpickle

    table = health._table
    cached = table._snapshot

    def build() -> None:
        table._snapshot = None
        table.snapshot()

    try:
        build_ms = _median_ms(build, reps)
    finally:
        table._snapshot = cached  # as it was (None: the next snapshot() builds, as it would have)
    snapshot = table.snapshot()
    data = pickle.dumps(snapshot, protocol=5)
    return {
        "rows": len(snapshot.replicas),
        "snapshot_build_ms": build_ms,
        "awaiting_first_probe_ms": _median_ms(table.awaiting_first_probe, reps),
        "probe_selection_ms": _median_ms(
            lambda: [rid for rid in table.replica_ids() if health._probe_wanted(rid, False)], reps
        ),
        "snapshot_bytes": len(data),
        "pickle_ms": _median_ms(lambda: pickle.dumps(snapshot, protocol=5), reps),
        "cloudpickle_ms": _median_ms(lambda: cloudpickle.dumps(snapshot), reps),
        "unpickle_ms": _median_ms(lambda: pickle.loads(data), reps),
    }


def _ingress_costs(gateway: Any, reps: int) -> dict[str, Any]:
    snapshot = gateway._view.snapshot
    fresh = type(gateway._view)()  # a throw-away LocalView: the replica's own is not touched
    return {"rows": len(snapshot.replicas), "apply_ms": _median_ms(lambda: fresh.apply(snapshot), reps)}


def _window(obj: Any, t0: float, t1: float) -> dict[str, Any]:
    rec = obj._bench_recorder
    out: dict[str, Any] = {"loop_lag": _lag_stats(rec.lags, t0, t1)}
    if hasattr(rec, "probe_rounds"):  # the ReplicaHealth recorder
        every = list(rec.probe_rounds)
        rounds = [(a, b, n) for a, b, n in every if t0 <= a <= t1]
        big = max((n for _, _, n in rounds), default=0)
        cut = max(1, big // 2)  # a full round probes every READY pod; a prompt one, the few new ones
        full = [(b - a) for a, b, n in rounds if n > cut]
        small = [(b - a) for a, b, n in rounds if n <= cut]
        out["full_rounds_raw"] = [(a, b, n) for a, b, n in every if n > cut and b >= t0 - 2]  # for the events
        out["probe_rounds"] = {
            "count": len(rounds),
            "full_rounds": len(full),
            "full_round_size": big if full else None,
            "full_round_ms_mean": 1000 * statistics.fmean(full) if full else None,
            "full_round_ms_max": 1000 * max(full) if full else None,
            "per_s": len(rounds) / max(t1 - t0, 1e-9),
            "busy_fraction": sum(b - a for a, b, _ in rounds) / max(t1 - t0, 1e-9),
            "small_rounds": len(small),
            "small_round_ms_mean": 1000 * statistics.fmean(small) if small else None,
        }
        scrapes = sorted((a, b) for a, b in list(rec.scrapes) if t0 <= a <= t1)
        spans: list[list[float]] = []  # union of the scrape intervals: the bursts
        for a, b in sorted((a, b) for a, b in list(rec.scrapes) if b >= t0 - 2 and a <= t1):
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
        busy = sum(min(b, t1) - max(a, t0) for a, b in spans if b > t0 and a < t1)
        out["scrape_spans_raw"] = [tuple(span) for span in spans]
        out["load_scrapes"] = {"count": len(scrapes), "busy_fraction": busy / max(t1 - t0, 1e-9)}
        versions = [v for t, v in list(rec.versions) if t0 <= t <= t1]
        out["table_versions"] = len(versions)
    else:
        applied = [a for a in list(rec.applied) if t0 <= a[0] <= t1]
        out["snapshots_applied"] = len(applied)
    return out


# ======================================================================================
# Statistics and rendering
# ======================================================================================


def dist(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    return {
        "n": len(vals),
        "p50": percentile(vals, 0.50),
        "p99": percentile(vals, 0.99),
        "max": max(vals) if vals else None,
        "mean": statistics.fmean(vals) if vals else None,
    }


def fmt(value: Any, width: int = 7, digits: int = 1) -> str:
    return cell(value, width, digits, big=float("inf"))


# ======================================================================================
# The benchmark
# ======================================================================================


@dataclass
class Event:
    scale: int
    kind: str  # ready | terminate
    pod: str
    t_send: float = 0.0
    t_ack: float = 0.0
    ingress: dict[str, dict[str, Any]] = field(default_factory=dict)  # who -> first record with the target
    http: dict[str, float] = field(default_factory=dict)  # ingress replica id -> first poll that showed it
    t_watch: float | None = None
    t_table_endpoint: float | None = None
    t_table: float | None = None
    timed_out: bool = False
    # ready: what the actor's prober was busy with when the table saw the pod Ready:
    # "round" (a full probe round), "scrape" (a /metrics scrape burst, same connection pool) or "idle"
    probe_context: str | None = None

    @property
    def target(self) -> str:
        return "READY" if self.kind == "ready" else "DRAINING"

    def ms(self, t: float | None, origin: float | None = None) -> float | None:
        base = self.t_ack if origin is None else origin
        return None if t is None or base is None else 1000 * (t - base)

    def stages(self) -> dict[str, float | None]:
        t_all = max((r["t"] for r in self.ingress.values()), default=None) if not self.timed_out else None
        t_first = min((r["t"] for r in self.ingress.values()), default=None)
        created = [r["created"] for r in self.ingress.values()]
        deliver = [r["t"] - r["created"] for r in self.ingress.values()]
        stages = {
            "total": self.ms(t_all),
            "first_ingress": self.ms(t_first),
            "api": 1000 * (self.t_ack - self.t_send),
            "watch": self.ms(self.t_watch),
            "dispatch": self.ms(self.t_table_endpoint, self.t_watch) if self.t_watch else None,
            "probe": self.ms(self.t_table, self.t_table_endpoint) if self.kind == "ready" and self.t_table_endpoint else None,
            "publish": 1000 * (min(created) - self.t_table) if created and self.t_table else None,
            "deliver": 1000 * max(deliver) if deliver else None,
            "to_actor": self.ms(self.t_table),
            "actor_to_ingress": self.ms(t_all, self.t_table) if t_all and self.t_table else None,
        }
        if self.http:
            stages["http_total"] = self.ms(max(self.http.values())) if len(self.http) == len(self.ingress) else None
        return stages

    def as_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale, "kind": self.kind, "pod": self.pod, "timed_out": self.timed_out,
            "t_send": self.t_send, "t_ack": self.t_ack, "t_watch": self.t_watch,
            "t_table_endpoint": self.t_table_endpoint, "t_table": self.t_table,
            "ingress": self.ingress, "http": self.http, "stages_ms": self.stages(),
            "probe_context": self.probe_context,
        }


class HttpPoller:
    """Optional independent observer: polls /admin/replicas through Serve's HTTP port."""

    def __init__(self, base_url: str, interval_s: float) -> None:
        self.url = base_url + "/admin/replicas"
        self.interval_s = interval_s
        self._target: tuple[str, str, dict[str, float]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._armed = threading.Event()  # set while there is a target: wakes the poller at once
        self._seq = 0  # which target a poll was for (gaps between events are not poll periods)
        self.polls: list[tuple[float, float, int]] = []  # (start, end, target seq) of each poll
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="http-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._armed.set()
        self._thread.join(timeout=10)

    def watch(self, pod: str, state: str) -> dict[str, float]:
        seen: dict[str, float] = {}
        with self._lock:
            self._seq += 1
            self._target = (pod, state, seen, self._seq)
        self._armed.set()
        return seen

    def clear(self) -> None:
        with self._lock:
            self._target = None
            self._armed.clear()

    def _run(self) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        conn: http.client.HTTPConnection | None = None
        who_re = re.compile(r'"ingress_replica":"([^"]+)"')
        while not self._stop.is_set():
            with self._lock:
                target = self._target
            if target is None:
                self._armed.wait(1.0)
                continue
            start = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                conn.request("GET", parts.path)
                resp = conn.getresponse()
                body = resp.read().decode()
            except Exception:  # noqa: BLE001 - count it, reconnect
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.1)
                continue
            end = time.time()
            pod, state, seen, seq = target
            self.polls.append((start, end, seq))
            who = who_re.search(body)
            i = body.find(f'"replica_id":"{pod}"')
            if who and i >= 0:
                j = body.find('"state":"', i)
                got = body[j + 9: body.find('"', j + 9)] if j >= 0 else ""
                if got == state and who.group(1) not in seen:
                    seen[who.group(1)] = end  # conservative: when the answer was in hand
            elapsed = time.time() - start
            if elapsed < self.interval_s:
                self._stop.wait(self.interval_s - elapsed)
        if conn is not None:
            conn.close()

    def period_stats(self, t0: float, t1: float) -> dict[str, Any]:
        polls = [p for p in self.polls if t0 <= p[0] <= t1]
        gaps = [b[0] - a[0] for a, b in zip(polls, polls[1:]) if a[2] == b[2]]  # within one event
        if not gaps:
            return {"polls": len(polls)}
        durations = [b - a for a, b, _ in polls]
        return {
            "polls": len(polls),
            "period_ms_mean": 1000 * statistics.fmean(gaps),
            "period_ms_p99": 1000 * percentile(gaps, 0.99),
            "request_ms_mean": 1000 * statistics.fmean(durations),
        }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.sims: list[Any] = []
        self.cp: Any = None
        self.api: Any = None
        self.core: Any = None
        self.namespace = f"{NAMESPACE_PREFIX}-{uuid.uuid4().hex[:6]}"
        self.ray_started = False
        self.serve_started = False
        self.http_port: int | None = None
        self.udp: socket.socket | None = None
        self.actor: Any = None
        self.ingress: dict[str, Any] = {}  # who (actor name) -> actor handle
        self.pods: dict[str, str] = {}  # pod name -> "ready" | "notready"
        self.poller: HttpPoller | None = None
        self.info: dict[str, Any] = {}

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        from controlplane import ControlPlane, find_binaries
        from vllm_sim.testing import SimulatorProcess, free_port

        args = self.args
        bins = find_binaries()
        if bins is None:
            raise SystemExit(
                "no kube-apiserver/etcd: run `bash controlplane/build.sh` (needs Go) or set KUBEBUILDER_ASSETS"
            )
        log(f"starting {args.sims} simulator(s) on 127.0.0.2..127.0.0.{args.sims + 1}")
        for i in range(args.sims):
            host = f"127.0.0.{2 + i}"
            sim = SimulatorProcess(["--model", MODEL, "--ttft", "0", "--itl", "0"], host=host, port=free_port(host))
            self.sims.append(sim)
            sim.start()
        for sim in self.sims:
            sim.wait_ready(timeout=30)

        log("starting kube-apiserver + etcd")
        self.cp = ControlPlane(bins)
        self.cp.start()
        self.info["controlplane_start_s"] = self.cp.startup_seconds
        from kubernetes import client

        self.api = self.cp.api_client()
        self.core = client.CoreV1Api(self.api)
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace)))

        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)

        import logging

        import ray
        from ray import serve

        from serve_app.config import GatewayConfig
        from serve_app.control import ReplicaHealth
        from serve_app.ingress import Gateway

        log("starting a local Ray + Serve")
        self.ray_started = True  # before: an interrupted ray.init still gets ray.shutdown()
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
            namespace="bench-propagation", logging_level=logging.WARNING,
        )
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # ray.init() put in its own SIGTERM handler (kill the local Ray processes, exit):
        # put ours back, so SIGTERM goes through the orderly stop() below like Ctrl-C.
        signal.signal(signal.SIGTERM, _on_sigterm)
        self.serve_started = True
        self.http_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})
        config = GatewayConfig.model_validate({
            "discovery": {
                "kind": "kubernetes",
                "namespace": self.namespace,
                "label_selector": "app=vllm",
                "kubeconfig": str(self.cp.admin_kubeconfig_path),
            },
            "health": {
                "probe_interval_s": args.probe_interval,
                "probe_timeout_s": 2.0,
                "metrics_interval_s": args.metrics_interval,
            },
        })
        log(f"deploying the gateway ({args.ingress_replicas} ingress replica(s), namespace {self.namespace})")
        app = Gateway.options(num_replicas=args.ingress_replicas, ray_actor_options={"num_cpus": 0}).bind(
            config, ReplicaHealth.bind(config)
        )
        serve.run(app, name=APP, route_prefix="/", logging_config={"enable_access_log": False})
        self._install_recorders()
        if args.http_poll:
            self.poller = HttpPoller(f"http://127.0.0.1:{self.http_port}", args.poll_interval)
            self.poller.start()

    def _install_recorders(self) -> None:
        import ray

        prefix = f"SERVE_REPLICA::{APP}#"
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        for entry in names:
            handle = ray.get_actor(entry["name"], namespace=entry["namespace"])
            deployment = entry["name"][len(prefix):].split("#")[0]
            if deployment == "ReplicaHealth":
                self.actor = handle
            elif deployment == "Gateway":
                self.ingress[entry["name"]] = handle
        if self.actor is None or len(self.ingress) != self.args.ingress_replicas:
            raise RuntimeError(f"expected 1 ReplicaHealth and {self.args.ingress_replicas} Gateway replicas, got {names}")
        notes = ray.get(self.actor.__ray_call__.remote(_in_replica, _install_actor))
        port = self.udp.getsockname()[1]
        ray.get([h.__ray_call__.remote(_in_replica, _install_ingress, port, who) for who, h in self.ingress.items()])
        for note in notes:
            log(f"note: {note}")
        log(f"recorders installed in ReplicaHealth and {len(self.ingress)} Gateway replica(s)")

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.stop()
        stop_serve_and_ray(log, serve_started=self.serve_started, ray_started=self.ray_started)
        if self.api is not None:
            try:
                self.api.close()
            except Exception:  # noqa: BLE001
                pass
        if self.cp is not None:
            log("stopping kube-apiserver + etcd")
            try:
                self.cp.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"control plane stop failed: {exc!r}")
        for sim in self.sims:
            try:
                sim.close()  # SIGTERM by PID, SIGKILL after 10 s; removes its log
            except Exception as exc:  # noqa: BLE001
                log(f"simulator {sim.pid} stop failed: {exc!r}")
        if self.udp is not None:
            self.udp.close()

    # -- replica calls --------------------------------------------------------------------

    def _call_all(self, fn: Any, *args: Any) -> tuple[Any, dict[str, Any]]:
        import ray

        refs = [self.actor.__ray_call__.remote(_in_replica, fn, *args)]
        refs += [h.__ray_call__.remote(_in_replica, fn, *args) for h in self.ingress.values()]
        results = ray.get(refs, timeout=60)
        return results[0], dict(zip(self.ingress, results[1:]))

    def _call_actor(self, fn: Any, *args: Any) -> Any:
        import ray

        return ray.get(self.actor.__ray_call__.remote(_in_replica, fn, *args), timeout=60)

    def _call_ingress(self, fn: Any, *args: Any) -> dict[str, Any]:
        import ray

        refs = [h.__ray_call__.remote(_in_replica, fn, *args) for h in self.ingress.values()]
        return dict(zip(self.ingress, ray.get(refs, timeout=60)))

    # -- pods -----------------------------------------------------------------------------

    def pod_id(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def sim_for(self, name: str) -> Any:
        return self.sims[int(name.rsplit("-", 1)[1]) % len(self.sims)]

    def _create(self, api: Any, name: str, ready: bool) -> None:
        from controlplane import kubelet

        sim = self.sim_for(name)
        kubelet.create_pod(
            api, self.namespace, name, labels={**POD_LABELS, PORT_LABEL: str(sim.port)},
            ip=sim.host, ready=ready, port=sim.port, termination_grace_period_seconds=TERMINATION_GRACE_S,
        )

    def grow_to(self, n: int) -> None:
        f = self.args.ready_fraction
        todo = []
        for i in range(len(self.pods), n):
            name = f"p-{i:05d}"
            ready = int((i + 1) * f) > int(i * f)
            todo.append((name, ready))
        if not todo:
            return
        log(f"creating {len(todo)} pod(s) ({sum(r for _, r in todo)} Ready)")
        start = time.monotonic()
        local = threading.local()
        clients: list[Any] = []
        lock = threading.Lock()

        def create(item: tuple[str, bool]) -> None:
            if not hasattr(local, "api"):
                local.api = self.cp.api_client()
                with lock:
                    clients.append(local.api)
            self._create(local.api, *item)

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(create, item) for item in todo]
            try:
                for fut in concurrent.futures.as_completed(futures):
                    fut.result()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        for api in clients:
            api.close()
        for name, ready in todo:
            self.pods[name] = "ready" if ready else "notready"
        log(f"created in {time.monotonic() - start:.1f}s")

    def wait_population(self, timeout_s: float) -> dict[str, Any]:
        n = len(self.pods)
        ready = sum(state == "ready" for state in self.pods.values())
        want = {"READY": ready, "PENDING": n - ready} if ready < n else {"READY": ready}
        start = time.monotonic()
        while True:
            actor, ingress = self._call_all(_actor_summary_or_ingress)
            views = [actor, *ingress.values()]
            if all(v["rows"] == n and all(v["states"].get(k, 0) == c for k, c in want.items()) for v in views):
                return {"seconds": time.monotonic() - start, "actor": actor, "ingress": ingress}
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"the gateway did not reach {n} pods ({want}) in {timeout_s:.0f}s: {views}")
            time.sleep(0.25)

    # -- one event ------------------------------------------------------------------------

    def _drain_udp(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                data = self.udp.recv(65536)
            except BlockingIOError:
                return out
            out.append(json.loads(data))

    def _wait_ingress(
        self, pod: str, state: str, need_url: bool, since: float, deadline: float
    ) -> dict[str, dict[str, Any]]:
        """Wait for every ingress recorder to report `pod` in `state` (at or after `since`); who -> record."""
        seen: dict[str, dict[str, Any]] = {}
        while len(seen) < len(self.ingress):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([self.udp], [], [], min(remaining, 1.0))
            if not ready:
                # A datagram lost? The recorders keep every record: ask them.
                pulled = self._call_ingress(_pull, since)
                for who, result in pulled.items():
                    for rec in result["records"]:
                        if rec["pod"] == pod and rec["state"] == state and (rec["url"] or not need_url):
                            seen.setdefault(who, rec)
                continue
            for rec in self._drain_udp():
                if rec["t"] >= since and rec["pod"] == pod and rec["state"] == state and (rec["url"] or not need_url):
                    seen.setdefault(rec["who"], rec)
        return seen

    def _watch(self, pods: list[str]) -> float:
        """Arm the recorders for these pods; returns a time before any record they will make."""
        armed = time.time()
        self._call_all(_set_watch, pods)
        self._drain_udp()
        return armed

    def run_event(self, scale: int, kind: str) -> Event:
        from kubernetes import client

        from controlplane import kubelet

        wanted = "notready" if kind == "ready" else "ready"
        name = self.rng.choice(sorted(p for p, s in self.pods.items() if s == wanted))
        pod = self.pod_id(name)
        event = Event(scale=scale, kind=kind, pod=pod)
        armed = self._watch([pod])
        seen_http = self.poller.watch(pod, event.target) if self.poller else None
        sim = self.sim_for(name)
        if kind == "ready":
            body = {"status": kubelet.pod_status_body(phase="Running", ready=True, pod_ip=sim.host)}
            event.t_send = time.time()
            resp = self.core.patch_namespaced_pod_status(
                name, self.namespace, body, _content_type="application/merge-patch+json", _preload_content=False,
            )
        else:
            event.t_send = time.time()
            resp = self.core.delete_namespaced_pod(
                name, self.namespace, grace_period_seconds=TERMINATION_GRACE_S,
                body=client.V1DeleteOptions(grace_period_seconds=TERMINATION_GRACE_S), _preload_content=False,
            )
        event.t_ack = time.time()  # the apiserver's answer is in (body not parsed: no client-side cost)
        resp.read()  # drain it before the connection goes back to the pool
        resp.release_conn()
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"{kind} {pod}: apiserver answered {resp.status}")
        self.pods[name] = "ready" if kind == "ready" else "terminating"

        deadline = time.monotonic() + self.args.event_timeout
        event.ingress = self._wait_ingress(pod, event.target, False, armed, deadline)
        event.timed_out = len(event.ingress) < len(self.ingress)
        if seen_http is not None:
            # The HTTP observer gets a little more time to catch every ingress replica.
            until = time.monotonic() + 3.0
            while len(seen_http) < len(self.ingress) and time.monotonic() < until:
                time.sleep(0.01)
            self.poller.clear()
            event.http = dict(seen_http)
        pulled = self._call_actor(_pull, armed)
        for rec in pulled["watch_records"]:
            if rec["pod"] == pod and rec["endpoint_state"] == event.target and event.t_watch is None:
                event.t_watch = rec["t"]
        for rec in pulled["records"]:
            if rec["pod"] != pod:
                continue
            if rec["endpoint_state"] == event.target and event.t_table_endpoint is None:
                event.t_table_endpoint = rec["t"]
            if rec["state"] == event.target and event.t_table is None:
                event.t_table = rec["t"]
        if event.timed_out:
            log(f"  {kind} {pod}: not seen by every ingress replica after {self.args.event_timeout:.0f}s")
        if kind == "terminate":
            self._replace(name)
        return event

    def _replace(self, name: str) -> None:
        """Keep the population: force-delete the Terminating pod, create it again NotReady."""
        from controlplane import kubelet

        pod = self.pod_id(name)
        armed = self._watch([pod])
        kubelet.force_delete_pod(self.core, self.namespace, name)
        self._create(self.core, name, ready=False)
        self.pods[name] = "notready"
        got = self._wait_ingress(pod, "PENDING", True, armed, time.monotonic() + self.args.event_timeout)
        if len(got) < len(self.ingress):
            log(f"  replacement of {pod} not seen everywhere after {self.args.event_timeout:.0f}s")

    # -- one scale ------------------------------------------------------------------------

    def run_scale(self, scale: int, n_events: int) -> dict[str, Any]:
        self.grow_to(scale)
        population = self.wait_population(timeout_s=240)
        log(f"scale {scale}: view complete after {population['seconds']:.1f}s; settling")
        time.sleep(self.args.settle)
        actor_costs = self._call_actor(_actor_costs, 5)
        ingress_costs = self._call_ingress(_ingress_costs, 5)
        log(f"scale {scale}: {n_events} events")
        events: list[Event] = []
        t0 = time.time()
        for i in range(n_events):
            event = self.run_event(scale, "ready" if i % 2 == 0 else "terminate")
            events.append(event)
            time.sleep(self.rng.uniform(self.args.gap / 2, self.args.gap * 1.5))
        t1 = time.time()
        actor_window, ingress_window = self._call_all(_window, t0, t1)
        full_rounds = actor_window.pop("full_rounds_raw", [])
        scrape_spans = actor_window.pop("scrape_spans_raw", [])
        for event in events:
            t = event.t_table_endpoint
            if event.kind == "ready" and t is not None:
                if any(a <= t <= b for a, b, _ in full_rounds):
                    event.probe_context = "round"
                elif any(a <= t <= b for a, b in scrape_spans):
                    event.probe_context = "scrape"
                else:
                    event.probe_context = "idle"
        result: dict[str, Any] = {
            "scale": scale,
            "pods": {"total": len(self.pods), "ready": sum(s == "ready" for s in self.pods.values())},
            "population_wait_s": population["seconds"],
            "seconds": t1 - t0,
            "costs": {"actor": actor_costs, "ingress": ingress_costs},
            "window": {"actor": actor_window, "ingress": ingress_window},
            "events": [e.as_dict() for e in events],
            "summary": {},
        }
        if self.poller is not None:
            result["http_poll"] = self.poller.period_stats(t0, t1)
            # The same ingress replica, seen both ways: HTTP can only be later than its recorder.
            lags = [
                1000 * (e.http[who.rsplit("#", 1)[1]] - rec["t"])
                for e in events for who, rec in e.ingress.items() if who.rsplit("#", 1)[1] in e.http
            ]
            result["http_poll"]["after_recorder_ms"] = dist(lags)
            result["http_poll"]["earlier_than_recorder"] = sum(lag < 0 for lag in lags)
        for kind in ("ready", "terminate"):
            mine = [e for e in events if e.kind == kind]
            stages = [e.stages() for e in mine]
            keys = stages[0].keys() if stages else ()
            result["summary"][kind] = {k: dist([s[k] for s in stages]) for k in keys}
            result["summary"][kind]["timeouts"] = sum(e.timed_out for e in mine)
            if kind == "ready":
                # Was a full probe round in flight when the pod turned Ready? Its first probe waits for it.
                for context in ("round", "scrape", "idle"):
                    result["summary"][kind][f"probe_{context}"] = dist(
                        [s["probe"] for e, s in zip(mine, stages) if e.probe_context == context]
                    )
        return result


def _actor_summary_or_ingress(obj: Any) -> dict[str, Any]:
    return _actor_summary(obj) if hasattr(obj, "_table") else _ingress_summary(obj)


# ======================================================================================
# Output
# ======================================================================================


def render(report: dict[str, Any]) -> str:
    args = report["config"]
    lines = []
    observer = "recorders in each replica (wall clock, no polling)"
    lines.append(
        f"Pod change -> every ingress replica's local view  ({args['ingress_replicas']} ingress replica(s), "
        f"{args['sims']} simulator(s), probe_interval_s={args['probe_interval']}, "
        f"ready fraction {args['ready_fraction']}; observed by {observer})"
    )
    lines.append("ms from the apiserver's answer; 'ready' includes the actor's first /health probe of the pod")
    lines.append("")
    header = f"{'scale':>6} {'event':<10} {'n':>3} {'p50':>7} {'p99':>7} {'max':>7}   {'1st p50':>7} {'timeouts':>8}"
    if args["http_poll"]:
        header += f"   {'http p50':>8} {'http p99':>8} {'http max':>8}"
    lines.append(header)
    for scale in report["scales"]:
        for kind in ("ready", "terminate"):
            s = scale["summary"][kind]
            total = s["total"]
            row = (
                f"{scale['scale']:>6} {kind:<10} {total['n']:>3} {fmt(total['p50'])} {fmt(total['p99'])} "
                f"{fmt(total['max'])}   {fmt(s['first_ingress']['p50'])} {s['timeouts']:>8}"
            )
            if args["http_poll"]:
                h = s.get("http_total") or {}
                row += f"   {fmt(h.get('p50'), 8)} {fmt(h.get('p99'), 8)} {fmt(h.get('max'), 8)}"
            lines.append(row)
    lines.append("")
    lines.append("Where the time goes (ms, p50 / p99):")
    stages = ("api", "watch", "dispatch", "probe", "publish", "deliver", "to_actor", "actor_to_ingress")
    titles = ("api call", "watch", "dispatch", "probe", "publish", "deliver", "->actor", "actor->ingr")
    lines.append(f"{'scale':>6} {'event':<10} " + " ".join(f"{t:>13}" for t in titles))
    for scale in report["scales"]:
        for kind in ("ready", "terminate"):
            s = scale["summary"][kind]
            cells = []
            for key in stages:
                d = s.get(key) or {}
                cells.append(f"{fmt(d.get('p50'), 6)} /{fmt(d.get('p99'), 6)}" if d.get("n") else f"{'-':>13}")
            lines.append(f"{scale['scale']:>6} {kind:<10} " + " ".join(cells))
    lines.append("")
    lines.append(
        "Ready: the pod's first probe (ms p50 / max, n) by what the actor's prober was doing when the pod turned "
        "Ready: a full probe round, a /metrics scrape burst (same connection pool, limit 64), nothing:"
    )
    for scale in report["scales"]:
        s = scale["summary"]["ready"]
        cells = []
        for context, title in (("round", "full round"), ("scrape", "scrape burst"), ("idle", "idle")):
            d = s[f"probe_{context}"]
            cells.append(f"{title} {fmt(d['p50'])} /{fmt(d['max'])} (n={d['n']})")
        lines.append(f"{scale['scale']:>6}  " + "   ".join(cells))
    lines.append("")
    lines.append("Gateway costs at each size (medians, measured inside the replicas) and background load:")
    lines.append(
        f"{'scale':>6} {'rows':>5} {'build':>7} {'scan':>6} {'select':>7} {'KB':>6} {'pickle':>7} {'cpickle':>8} "
        f"{'unpickl':>8} {'apply':>6} | {'rounds/s':>8} {'full/s':>6} {'full ms':>8} {'busy':>5} {'scrape':>6} "
        f"{'act lag p99':>11} {'max':>6} {'ingr lag p99':>12} {'max':>6}"
    )
    for scale in report["scales"]:
        a = scale["costs"]["actor"]
        apply_ms = max(c["apply_ms"] for c in scale["costs"]["ingress"].values())
        w = scale["window"]["actor"]
        pr = w["probe_rounds"]
        lag = w["loop_lag"]
        ingr_lags = [x["loop_lag"] for x in scale["window"]["ingress"].values()]
        ingr_p99 = max((x.get("p99_ms") or 0) for x in ingr_lags)
        ingr_max = max((x.get("max_ms") or 0) for x in ingr_lags)
        lines.append(
            f"{scale['scale']:>6} {a['rows']:>5} {fmt(a['snapshot_build_ms'], 7, 2)} {fmt(a['awaiting_first_probe_ms'], 6, 2)} "
            f"{fmt(a['probe_selection_ms'], 7, 2)} {a['snapshot_bytes'] / 1024:>6.0f} {fmt(a['pickle_ms'], 7, 2)} "
            f"{fmt(a['cloudpickle_ms'], 8, 2)} {fmt(a['unpickle_ms'], 8, 2)} {fmt(apply_ms, 6, 2)} | "
            f"{pr['per_s']:>8.1f} {pr['full_rounds'] / max(scale['seconds'], 1e-9):>6.1f} {fmt(pr['full_round_ms_mean'], 8)} "
            f"{pr['busy_fraction']:>5.0%} {w['load_scrapes']['busy_fraction']:>6.0%} {fmt(lag.get('p99_ms'), 11)} {fmt(lag.get('max_ms'), 6)} "
            f"{fmt(ingr_p99, 12)} {fmt(ingr_max, 6)}"
        )
    lines.append(
        "  build = ReplicaTable.snapshot() from scratch (every version bump, once per publication); "
        "scan = awaiting_first_probe() (every table change);"
    )
    lines.append(
        "  select = the non-full probe round's O(n) selection; KB/pickle/cpickle/unpickl = the Snapshot on the wire; "
        "apply = LocalView.apply in an ingress replica;"
    )
    lines.append(
        "  rounds/s, full/s, full ms, busy = the actor's probe rounds during the events (full: every READY pod; busy: share "
        "of time a round is in flight);"
    )
    lines.append(
        "  scrape = share of time a /metrics load scrape is in flight; lag = event-loop lag (20 ms timer)"
    )
    for scale in report["scales"]:
        pr = scale["window"]["actor"]["probe_rounds"]
        if pr["full_rounds"] == 0 and scale["seconds"] > 3 * args["probe_interval"]:
            lines.append(
                f"  NOTE scale {scale['scale']}: not one full probe round in {scale['seconds']:.0f}s of events "
                f"(probe_interval_s={args['probe_interval']}): each prompt round for a new Ready pod restarts "
                "the full-round timer, so READY pods were not health-checked at all meanwhile"
            )
    if args["http_poll"]:
        lines.append("")
        for scale in report["scales"]:
            h = scale.get("http_poll") or {}
            lines.append(
                f"HTTP observer at scale {scale['scale']}: {h.get('polls', 0)} polls, period "
                f"{fmt(h.get('period_ms_mean'), 0)} ms mean ({fmt(h.get('period_ms_p99'), 0)} p99), "
                f"each request {fmt(h.get('request_ms_mean'), 0)} ms (asked for every {args['poll_interval'] * 1000:.0f} ms)"
            )
            after = h.get("after_recorder_ms") or {}
            lines.append(
                f"  same replica, HTTP minus recorder: p50 {fmt(after.get('p50'), 0)} ms, max {fmt(after.get('max'), 0)} ms "
                f"over {after.get('n', 0)} observations; HTTP earlier than the recorder {h.get('earlier_than_recorder', 0)} time(s)"
            )
    return "\n".join(lines)


# ======================================================================================
# main
# ======================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default=None, help="pod counts, ascending (default 10,100,1000; --quick: 10,100)")
    p.add_argument("--events", type=int, default=None, help="events per scale, alternating ready/terminate (default 200; --quick: 20)")
    p.add_argument("--quick", action="store_true", help="scales 10,100 and 20 events each (~2 minutes)")
    p.add_argument("--ingress-replicas", type=int, default=2, choices=(1, 2), help="Gateway replicas (default 2)")
    p.add_argument("--sims", type=int, default=4, help="simulators, one per address 127.0.0.2.. (default 4); pods share them")
    p.add_argument("--ready-fraction", type=float, default=0.5, help="share of the pre-existing pods that are Ready (default 0.5)")
    p.add_argument("--probe-interval", type=float, default=0.5, help="health.probe_interval_s (default 0.5)")
    p.add_argument("--metrics-interval", type=float, default=2.0, help="health.metrics_interval_s (default 2, the config default)")
    p.add_argument("--gap", type=float, default=0.1, help="mean pause between events, jittered +-50%% (default 0.1 s)")
    p.add_argument("--settle", type=float, default=1.0, help="pause once a scale's pods are all in the view (default 1 s)")
    p.add_argument("--event-timeout", type=float, default=20.0, help="give up on one event after this (default 20 s)")
    p.add_argument("--http-poll", action="store_true", help="also observe through GET /admin/replicas (adds load)")
    p.add_argument("--poll-interval", type=float, default=0.005, help="HTTP poll interval (default 0.005 s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="write the full report (every event) here")
    args = p.parse_args(argv)
    scales = args.scales or ("10,100" if args.quick else "10,100,1000")
    args.scales = sorted({int(s) for s in scales.split(",") if s.strip()})
    if args.events is None:
        args.events = 20 if args.quick else 200
    if not 0 < args.ready_fraction < 1:
        p.error("--ready-fraction must be between 0 and 1 (exclusive): events need Ready and NotReady pods")
    if not 1 <= args.sims <= 200:
        p.error("--sims must be 1..200")
    return args


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(args)
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "meta": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "scales": [],
    }
    started = time.monotonic()
    failed = False
    try:
        bench.start()
        report["meta"].update(bench.info, namespace=bench.namespace)
        for scale in args.scales:
            report["scales"].append(bench.run_scale(scale, args.events))
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({type(exc).__name__}); cleaning up")
        failed = True
    finally:
        previous = signal.signal(signal.SIGINT, lambda *_: log("still cleaning up, please wait"))
        signal.signal(signal.SIGTERM, lambda *_: log("still cleaning up, please wait"))
        try:
            bench.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
    report["meta"]["loadavg_end"] = os.getloadavg()
    report["meta"]["seconds"] = time.monotonic() - started
    if report["scales"]:
        print(render(report))
        print(f"\n(run took {report['meta']['seconds']:.0f}s; load average at start "
              f"{report['meta']['loadavg_start'][0]:.1f}, at end {report['meta']['loadavg_end'][0]:.1f} on "
              f"{report['meta']['cpus']} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.json}")
    return 130 if failed else 0


if __name__ != "__main__":
    # Imported (e.g. `python -c 'import bench.propagation'`): ship the replica-side code by
    # value anyway, the replicas cannot import the bench package.
    try:
        from ray import cloudpickle as _cp

        _cp.register_pickle_by_value(sys.modules[__name__])
    except Exception:  # noqa: BLE001
        pass

if __name__ == "__main__":
    sys.exit(main())
