#!/usr/bin/env python
"""How well does each routing policy use the replicas' prefix caches? One seeded trace per
workload, replayed through every path over the same simulated vLLM replicas, made cold
before each path, in one run:

  hand                     the client sends each prefix group (or conversation) to "its"
                           replica directly: the placement an operator would make by hand
  gateway:<router>         through the gateway (one ingress replica), router chosen per
                           request with the x-gateway-router header: cache_aware,
                           least_request, session_affinity, power_of_two
  gateway4:cache_aware     the gateway with 4 ingress replicas (do their indexes agree?)
  gateway-kv:cache_aware   the gateway in precise mode: its index fed by the simulators'
                           KV events (routing.kv_events, routing.tokenizer vllm_sim)
  gateway4-kv:cache_aware  precise mode with 4 ingress replicas
  sglang:cache_aware       sglang-router (PyPI sglang-router==0.3.2), when installed
  vllm-router:cache_aware  vllm-router (PyPI vllm-router==0.1.17), when installed
  vllm-router:kv_aware     vllm-router fed by the simulators' KV events (ZeroMQ)

Workloads: shared_prefix (groups of requests sharing a long system prompt, sized to
exceed one replica's cache but fit the cluster), multi_turn (chats whose history grows),
zipf (Zipf-popular groups: one hot prefix), no_sharing (every prompt unique), churn
(shared_prefix while one replica is killed and, later, a new one added).

Per path it prints TTFT p50/p90/p99, completed requests/s, the simulators' prefix-cache
hit rate, the gateway's routing precision (tokens it predicted cached vs tokens the
simulators found cached), the router's CPU per request and its index memory; then the
targets of the cache-aware router, each beside its figure.

    python bench/routing.py --quick                     # every workload and path, short traces (~15 min)
    python bench/routing.py                             # every workload and path (~30 min)
    python bench/routing.py --quick --workloads shared_prefix --paths hand,gateway:cache_aware   # ~1.5 min
    python bench/routing.py --workloads shared_prefix --paths hand,gateway,sglang
    python bench/routing.py --json /tmp/routing.json

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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
    SimulatorProcess,
    direct_ingress_ports,
    free_port,
    installed_version,
    listener_of,
    percentile,
    rss_bytes,
    serve_mode_environment,
    serve_replica_pids,
)
from vllm_sim.testing import metric_value, port_bindable  # noqa: E402

MODEL = "bench-model"
APP = "routing-gateway"
CHAT_PATH = "/v1/chat/completions"
ROUTER_HEADER = "x-gateway-router"
GATEWAY_KINDS = ("gateway", "gateway4", "gateway-kv", "gateway4-kv")
GATEWAY_ROUTERS = ("cache_aware", "least_request", "session_affinity", "power_of_two")
ALL_PATHS = (
    "hand",
    *(f"gateway:{r}" for r in GATEWAY_ROUTERS),
    "gateway4:cache_aware",
    "gateway-kv:cache_aware",
    "gateway4-kv:cache_aware",
    "sglang:cache_aware",
    "vllm-router:cache_aware",
    "vllm-router:kv_aware",
)
PATH_ALIASES = {
    "gateway": [p for p in ALL_PATHS if p.startswith("gateway")],
    "peers": [p for p in ALL_PATHS if p.startswith(("sglang", "vllm-router"))],
    "sglang": ["sglang:cache_aware"],
    "vllm-router": ["vllm-router:cache_aware", "vllm-router:kv_aware"],
    "all": list(ALL_PATHS),
}
WORKLOADS = ("shared_prefix", "multi_turn", "zipf", "no_sharing", "churn")
PEER_VERSIONS = {"sglang-router": "0.3.2", "vllm-router": "0.1.17"}
# The issue's reference run (older simulator: per-request prefill, not a shared engine step).
ISSUE_REFERENCE = (
    ("by-hand placement", 31, 32, 0.96),
    ("gateway least_request", 433, 435, 0.24),
    ("vllm-router 0.1.17 cache_aware", 433, 435, 0.23),
    ("sglang-router 0.3.2 cache_aware", 31, 431, 0.85),
)


def log(msg: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Traces: seeded, the same bytes for every path
# --------------------------------------------------------------------------------------

# Words of three letters: with the separating space, 4 bytes per word. The simulator
# counts one token per word and the gateway, which has no tokenizer, estimates one token
# per 4 bytes, so both count (nearly) the same tokens and the gateway's 64-byte blocks are
# the simulator's 16-token blocks.
_VOCAB = [a + b + c for a in "abcdefghijklmnopqrstuvwxyz" for b in "aeiouy" for c in "bdfgklmnprstvz"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_VOCAB, k=n))


@dataclass
class Req:
    """One request of an open-loop trace: sent at `at` seconds after the trace starts."""

    at: float
    messages: list[dict[str, str]]
    key: int | None  # hand placement: group or conversation; None = round-robin
    max_tokens: int
    group: int | None = None


@dataclass
class Conversation:
    """A chat: each turn is sent when the last answer has arrived and `think` has passed;
    the history (with the answers as the replica wrote them) grows turn by turn."""

    start: float
    system: str
    turns: list[str]
    think: list[float]
    key: int
    max_tokens: int


@dataclass
class Trace:
    name: str
    title: str
    requests: list[Req] = field(default_factory=list)
    conversations: list[Conversation] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (at, "kill" | "add")
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.requests) + sum(len(c.turns) for c in self.conversations)


def poisson_times(rng: random.Random, n: int, rate: float) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def shared_prefix_trace(args: argparse.Namespace, name: str = "shared_prefix", seed_offset: int = 0) -> Trace:
    rng = random.Random(args.seed * 1000 + 1 + seed_offset)
    systems = [words(rng, args.prompt_words) for _ in range(args.groups)]
    n = args.sizes[name]
    reqs = []
    for at in poisson_times(rng, n, args.rate):
        g = rng.randrange(args.groups)
        msgs = [{"role": "system", "content": systems[g]}, {"role": "user", "content": words(rng, args.user_words)}]
        reqs.append(Req(at, msgs, g, args.max_tokens, g))
    return Trace(name, f"{args.groups} groups x {args.prompt_words}-word system prompt + {args.user_words}-word question; "
                 f"{n} streamed chats (max_tokens {args.max_tokens}) at {args.rate:g}/s, Poisson",
                 requests=reqs, info={"groups": args.groups, "rate": args.rate})


def churn_trace(args: argparse.Namespace) -> Trace:
    trace = shared_prefix_trace(args, "churn", seed_offset=7)
    end = trace.requests[-1].at if trace.requests else 0.0
    trace.events = [(end / 3, "kill"), (2 * end / 3, "add")]
    trace.title = (f"shared_prefix ({args.groups} groups, {len(trace.requests)} chats at {args.rate:g}/s); "
                   f"replica 0 SIGKILLed at {end / 3:.1f}s, a new replica started and added at {2 * end / 3:.1f}s")
    return trace


def zipf_trace(args: argparse.Namespace) -> Trace:
    rng = random.Random(args.seed * 1000 + 3)
    systems = [words(rng, args.prompt_words) for _ in range(args.groups)]
    weights = [1 / (k + 1) ** args.zipf_s for k in range(args.groups)]
    n = args.sizes["zipf"]
    reqs = []
    for at in poisson_times(rng, n, args.rate):
        g = rng.choices(range(args.groups), weights)[0]
        msgs = [{"role": "system", "content": systems[g]}, {"role": "user", "content": words(rng, args.user_words)}]
        reqs.append(Req(at, msgs, g, args.zipf_max_tokens, g))
    hot = sum(1 for r in reqs if r.group == 0) / max(1, n)
    return Trace("zipf", f"{args.groups} groups, Zipf s={args.zipf_s:g} (hot prefix: {hot:.0%} of requests); "
                 f"{n} chats (max_tokens {args.zipf_max_tokens}) at {args.rate:g}/s",
                 requests=reqs, info={"hot_share": round(hot, 3)})


def no_sharing_trace(args: argparse.Namespace) -> Trace:
    rng = random.Random(args.seed * 1000 + 4)
    n = args.sizes["no_sharing"]
    reqs = []
    for i, at in enumerate(poisson_times(rng, n, args.unique_rate)):
        # A unique first word: no two prompts share even their first block.
        text = f"q{i:05d}x{rng.randrange(1 << 30):08x} " + words(rng, args.unique_words)
        reqs.append(Req(at, [{"role": "user", "content": text}], None, args.max_tokens))
    return Trace("no_sharing", f"every prompt unique ({args.unique_words} words); {n} chats at {args.unique_rate:g}/s",
                 requests=reqs)


def multi_turn_trace(args: argparse.Namespace) -> Trace:
    rng = random.Random(args.seed * 1000 + 2)
    convs = []
    for c in range(args.conversations):
        turns = [words(rng, args.first_user_words)] + [words(rng, args.turn_words) for _ in range(args.turns - 1)]
        think = [rng.expovariate(1 / args.think_s) for _ in range(args.turns)]
        convs.append(Conversation(rng.uniform(0, args.conv_spread_s), words(rng, args.conv_system_words),
                                  turns, think, c, args.turn_max_tokens))
    final = args.conv_system_words + args.first_user_words + (args.turns - 1) * (args.turn_words + args.turn_max_tokens)
    return Trace("multi_turn", f"{args.conversations} chats x {args.turns} turns, history grows to ~{final} words "
                 f"(system {args.conv_system_words}, +{args.turn_words} user +{args.turn_max_tokens} answer per turn), "
                 f"think ~{args.think_s:g}s", conversations=convs)


BUILDERS = {
    "shared_prefix": shared_prefix_trace,
    "multi_turn": multi_turn_trace,
    "zipf": zipf_trace,
    "no_sharing": no_sharing_trace,
    "churn": churn_trace,
}


# --------------------------------------------------------------------------------------
# The simulated replicas
# --------------------------------------------------------------------------------------


def simulator_flags() -> set[str]:
    """The simulator's flags, from its --help (it is being rewritten: adapt, don't assume)."""
    out = subprocess.run([sys.executable, "-m", "vllm_sim", "--help"], capture_output=True, text=True,
                         cwd=str(REPO), timeout=60)
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", out.stdout))


@dataclass
class SimSettings:
    args: list[str]
    blocks: int
    block_size: int
    description: str
    kv_events: bool


def sim_settings(args: argparse.Namespace, flags: set[str], kv_events: bool) -> SimSettings:
    bs = 16
    prompt_blocks = math.ceil((args.prompt_words + 2) / bs)
    room = math.ceil((args.user_words + max(args.max_tokens, args.zipf_max_tokens) + 8) / bs)
    blocks = args.num_gpu_blocks or (round(args.cache_prompts * prompt_blocks) + args.slots * room)
    max_len = min(blocks * bs, 4096)
    sim_args = ["--model", MODEL, "--max-num-seqs", str(args.slots), "--prefill-per-token", str(args.prefill_per_token),
                "--ttft", str(args.sim_ttft), "--itl", str(args.itl), "--keepalive-timeout", "120"]
    if "--num-gpu-blocks" in flags:
        sim_args += ["--num-gpu-blocks", str(blocks), "--block-size", str(bs)]
        if "--max-model-len" in flags:
            sim_args += ["--max-model-len", str(max_len)]
    elif "--prefix-cache-blocks" in flags:
        sim_args += ["--prefix-cache-blocks", str(blocks)]
    else:
        raise RuntimeError("the simulator has neither --num-gpu-blocks nor --prefix-cache-blocks")
    if args.max_num_batched_tokens and "--max-num-batched-tokens" in flags:
        sim_args += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if kv_events and "--kv-events-config" not in flags:
        raise RuntimeError("the simulator has no --kv-events-config (needed by vllm-router:kv_aware, gateway-kv)")
    desc = (f"{args.slots} slots, KV cache {blocks} blocks x {bs} = {blocks * bs} tokens "
            f"(~{blocks / prompt_blocks:.1f} of the {args.prompt_words}-word prompts), prefill {args.prefill_per_token * 1e3:g} ms/token, "
            f"ttft {args.sim_ttft * 1e3:g} ms + itl {args.itl * 1e3:g} ms")
    return SimSettings(sim_args, blocks, bs, desc, kv_events)


EVENT_PORT_OFFSET = 1000


def _port_with_free_offset(offset: int, taken: set[int]) -> int:
    """A free HTTP port p with p + offset and p + offset + 1 free too (events, replay)."""
    rng = random.Random()
    for _ in range(500):
        p = rng.randrange(15000, 20000)
        ports = (p, p + offset, p + offset + 1)
        if not taken.intersection(ports) and not taken.intersection((p - offset, p - offset - 1)) and all(map(port_bindable, ports)):
            return p
    raise RuntimeError("no free port with free event ports at the offset")


COUNTER_KEYS = ("prefix_queries_tokens", "prefix_hits_tokens", "completed_total", "prompt_tokens_total",
                "generation_tokens_total", "preemptions_total", "busy_seconds_total", "aborted_total")


def _http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Cluster:
    """The base replicas (and a spare for churn), cold before every path, counted per path."""

    def __init__(self, args: argparse.Namespace, settings: SimSettings, spare: bool) -> None:
        self.settings = settings
        self.event_ports: dict[str, int] = {}
        self.base = [self._make() for _ in range(args.replicas)]
        self.spare = self._make() if spare else None
        self.cold_mode = args.cold
        self.victim: SimulatorProcess | None = None
        self._start: dict[str, dict[str, float]] = {}
        self._frozen: dict[str, dict[str, float]] = {}

    def _make(self) -> SimulatorProcess:
        extra: list[str] = []
        if self.settings.kv_events:
            # One offset for every replica (the gateway finds a replica's events at its HTTP
            # port + routing.kv_events.port_offset, replay at one more).
            port = _port_with_free_offset(EVENT_PORT_OFFSET, taken=set(self.event_ports.values()))
            pub = port + EVENT_PORT_OFFSET
            extra = ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                                        "endpoint": f"tcp://*:{pub}", "replay_endpoint": f"tcp://*:{pub + 1}"})]
        else:
            port = free_port()
        sim = SimulatorProcess([*self.settings.args, *extra], port=port)
        if self.settings.kv_events:
            self.event_ports[sim.url] = pub
        return sim

    @property
    def all(self) -> list[SimulatorProcess]:
        return self.base + ([self.spare] if self.spare else [])

    def start(self) -> None:
        for sim in self.base:
            sim.start()
        for sim in self.base:
            sim.wait_ready(timeout=60)

    def live(self) -> list[SimulatorProcess]:
        return [s for s in self.all if s.is_running()]

    def stop(self) -> None:
        for sim in self.all:
            try:
                sim.close()
            except Exception:  # noqa: BLE001
                pass

    # -- state between paths -------------------------------------------------------

    def restore(self) -> bool:
        """The base replicas running, the spare stopped. True if a process changed."""
        changed = False
        if self.spare is not None and self.spare.is_running():
            self.spare.stop()
            changed = True
        for sim in self.base:
            if not sim.is_running():
                sim.start()
                sim.wait_ready(timeout=60)
                changed = True
        self.victim = None
        return changed

    def make_cold(self) -> str:
        """Empty every prefix cache: POST /reset_prefix_cache, or restart if it has none."""
        self._wait_idle()
        if self.cold_mode == "reset":
            for sim in self.base:
                deadline = time.monotonic() + 15
                while True:
                    status, body = _http("POST", sim.url + "/reset_prefix_cache")
                    if status == 200:
                        break
                    if status in (404, 405):
                        log("the simulator has no /reset_prefix_cache: restarting the simulators instead")
                        self.cold_mode = "restart"
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{sim.url}/reset_prefix_cache: {status} {body[:200]!r}")
                    time.sleep(0.1)
                if self.cold_mode == "restart":
                    break
        if self.cold_mode == "restart":
            for sim in self.base:
                sim.stop()
                sim.start()
            for sim in self.base:
                sim.wait_ready(timeout=60)
            return "restart"
        return "reset"

    def _wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for sim in self.base:
            while time.monotonic() < deadline:
                try:
                    st = sim.stats()
                except Exception:  # noqa: BLE001
                    break
                if not st.get("running") and not st.get("waiting") and not st.get("inflight"):
                    break
                time.sleep(0.1)

    # -- counters ------------------------------------------------------------------

    @staticmethod
    def counters(sim: SimulatorProcess) -> dict[str, float]:
        try:
            st = sim.stats()
        except Exception:  # noqa: BLE001 - gone
            return {}
        out = {k: float(st[k]) for k in COUNTER_KEYS if k in st}
        if "prefix_hits_tokens" not in out:  # an older simulator: read vLLM's counters
            text = sim.metrics_text()
            for key, names in (("prefix_hits_tokens", ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")),
                               ("prefix_queries_tokens", ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"))):
                for name in names:
                    value = metric_value(text, name)
                    if value is not None:
                        out[key] = value
                        break
        return out

    def begin(self) -> None:
        self._start = {s.url: self.counters(s) for s in self.live()}
        self._frozen = {}

    def kill(self, index: int = 0) -> SimulatorProcess:
        victim = self.base[index]
        self._frozen[victim.url] = self.counters(victim)
        victim.kill()
        self.victim = victim
        return victim

    def add_spare(self) -> SimulatorProcess:
        assert self.spare is not None
        self.spare.start()
        self.spare.wait_ready(timeout=60)
        self._start[self.spare.url] = self.counters(self.spare)
        return self.spare

    def totals(self) -> dict[str, dict[str, float]]:
        out = {}
        for url, start in self._start.items():
            sim = next(s for s in self.all if s.url == url)
            end = self._frozen.get(url) or (self.counters(sim) if sim.is_running() else {})
            out[url] = {k: end.get(k, v) - v for k, v in start.items()}
        return out

    def pids(self) -> list[int]:
        return [s.pid for s in self.live()]

    def event_seqs(self) -> dict[str, int]:
        """The sequence number of the last KV event batch each live base replica published."""
        out = {}
        for sim in self.base:
            try:
                out[sim.url] = int(sim.stats().get("kv_event_batches_total", 0)) - 1
            except Exception:  # noqa: BLE001
                pass
        return out


# --------------------------------------------------------------------------------------
# The gateway on Ray Serve
# --------------------------------------------------------------------------------------


class GatewayStack:
    """A local Ray + Serve; the gateway app is deployed fresh per workload and ingress count."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = args.mode
        self.http_port = free_port()
        self.ray_started = False
        self.serve_started = False
        self.deployed: tuple[int, tuple[str, ...], bool] | None = None
        self.bases: list[str] = []
        self.proxy_pid: int | None = None

    def start(self) -> None:
        os.environ.update(serve_mode_environment(self.mode))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        import ray
        from ray import serve

        log(f"starting a local Ray + Serve ({self.mode} ingress)")
        self.ray_started = True
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="bench-routing")
        # ray.init installs its own SIGTERM handler in the driver, which exits at once;
        # ours raises KeyboardInterrupt so everything started here is stopped first.
        signal.signal(signal.SIGTERM, _interrupt)
        self.serve_started = True
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})

    def deploy(self, ingress: int, urls: list[str], precise: bool = False) -> None:
        from ray import serve

        from serve_app.config import GatewayConfig
        from serve_app.control import ReplicaHealth
        from serve_app.ingress import Gateway

        self.delete()
        raw: dict[str, Any] = {
            "discovery": {"kind": "static", "urls": urls, "models": {u: [MODEL] for u in urls}},
            "router": "cache_aware",
            "health": self.args.gateway_health,
            "expose_replica_urls": True,  # x-gateway-replica names the simulator: placements per group
        }
        if precise:
            raw["routing"] = {"tokenizer": {"kind": "vllm_sim"},
                              "kv_events": {"enabled": True, "port_offset": EVENT_PORT_OFFSET, "replay": True, "block_size": 16}}
        config = GatewayConfig.model_validate(raw)
        log(f"deploying the gateway: {ingress} ingress replica(s) over {len(urls)} replica URL(s)"
            + (", precise mode (KV events)" if precise else ""))
        t0 = time.monotonic()
        app = Gateway.options(num_replicas=ingress, ray_actor_options={"num_cpus": 0}).bind(config, ReplicaHealth.bind(config))
        serve.run(app, name=APP, route_prefix="/", logging_config={"enable_access_log": False} if self.args.no_access_log else None)
        if self.mode == "direct":
            self.bases = [f"http://127.0.0.1:{p}" for p in direct_ingress_ports(APP, ingress)]
            self.proxy_pid = None
        else:
            self.bases = [f"http://127.0.0.1:{self.http_port}"]
            listener = listener_of(self.http_port)
            self.proxy_pid = listener["pid"] if listener else None
        self.deployed = (ingress, tuple(urls), precise)
        log(f"gateway deployed in {time.monotonic() - t0:.1f}s at {', '.join(self.bases)}")

    def delete(self) -> None:
        if self.deployed is None:
            return
        from ray import serve

        serve.delete(APP)
        self.deployed = None

    def pids(self) -> dict[str, list[int]]:
        reps = serve_replica_pids(APP)
        return {"proxy": [self.proxy_pid] if self.proxy_pid else [], "ingress": reps.get("Gateway", []),
                "health": reps.get("ReplicaHealth", [])}

    def _admin_views(self, polls: int) -> dict[str, dict[str, Any]]:
        """/admin/replicas as each ingress replica sees it (through the proxy: whoever answers)."""
        views: dict[str, dict[str, Any]] = {}
        for i in range(polls):
            base = self.bases[i % len(self.bases)]
            try:
                status, body = _http("GET", base + "/admin/replicas", timeout=5)
            except OSError:
                continue
            if status == 200:
                data = json.loads(body)
                views[data.get("ingress_replica", base)] = data
        return views

    def wait_ready(self, ready: set[str], ingress: int, timeout_s: float = 120.0,
                   event_seqs: dict[str, int] | None = None) -> None:
        """Until every ingress replica sees exactly `ready` as READY, with a load sample
        (cache size known) for each, and, in precise mode, has applied each replica's
        events up to `event_seqs` (the last batch each simulator published)."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            views = self._admin_views(max(4, 4 * ingress))
            good = 0
            for view in views.values():
                rows = view.get("replicas", [])
                now_ready = {r["replica_id"] for r in rows if r.get("state") == "READY"}
                loaded = {r["replica_id"] for r in rows if r.get("state") == "READY" and (r.get("load") or {}).get("cache_tokens")}
                synced = True
                if event_seqs is not None:
                    for r in rows:
                        want = event_seqs.get(r["replica_id"])
                        status = r.get("kv_events") or {}
                        if r["replica_id"] in ready and want is not None and want >= 0 and status.get("last_seq") != want:
                            synced = False
                            last = f"events of {r['replica_id']}: {status}, want seq {want}"
                if not (now_ready == ready and loaded == ready):
                    last = sorted(now_ready)
                if now_ready == ready and loaded == ready and synced:
                    good += 1
            if len(views) >= ingress and good == len(views):
                return
            time.sleep(0.3)
        raise RuntimeError(f"gateway not ready after {timeout_s:.0f}s: {last}, want READY {sorted(ready)}")

    def routing_counters(self) -> dict[str, float]:
        status, body = _http("GET", self.bases[0] + "/metrics", timeout=10)
        if status != 200:
            return {}
        text = body.decode()
        return {
            "predicted_cached": metric_value(text, "gateway_routing_predicted_cached_tokens_total") or 0.0,
            "prompt_tokens": metric_value(text, "gateway_routing_prompt_tokens_total") or 0.0,
        }

    def index_stats(self, ingress: int) -> dict[str, Any]:
        views = self._admin_views(max(4, 6 * ingress))
        per = {}
        for iid, view in views.items():
            routing = view.get("routing", {})
            per[iid] = {
                "entries": routing.get("prefix_index_entries"),
                "max_entries": routing.get("prefix_index_max_entries"),
                "bytes": routing.get("prefix_index_bytes_estimate"),
                "per_replica_blocks": {r["replica_id"]: r.get("prefix_index_blocks") for r in view.get("replicas", [])},
                "kv_events": {r["replica_id"]: r.get("kv_events") for r in view.get("replicas", []) if r.get("kv_events")},
                "learned": routing.get("learned"),
            }
        return per

    def index_mode(self) -> str | None:
        for view in self._admin_views(2).values():
            return (view.get("routing") or {}).get("prefix_index")
        return None

    def stop(self) -> None:
        import ray

        if self.serve_started and ray.is_initialized():
            try:
                from ray import serve

                log("serve.shutdown()")
                serve.shutdown()
            except BaseException as exc:  # noqa: BLE001
                log(f"serve.shutdown failed: {exc!r}")
        if self.ray_started:
            try:
                log("ray.shutdown()")
                ray.shutdown()
            except BaseException as exc:  # noqa: BLE001
                log(f"ray.shutdown failed: {exc!r}")


# --------------------------------------------------------------------------------------
# Peer routers (separate processes)
# --------------------------------------------------------------------------------------


PeerUnavailable = RouterUnavailable  # the peer cannot run here; the reason goes in the table


class PeerRouter(RouterProcess):
    """sglang-router or vllm-router (bench/common.RouterProcess), plus what this benchmark
    needs: the simulators' KV event sources for vllm-router kv_aware, adding a replica on
    churn, and a note when the installed version is not the one the issue measured."""

    def __init__(self, kind: str, policy: str, cluster: Cluster, args: argparse.Namespace) -> None:
        super().__init__("sglang" if kind == "sglang" else "vllm", policy, [])
        self.cluster = cluster
        self.args = args
        self.notes: list[str] = []
        if self.version is not None and self.version != PEER_VERSIONS[self.dist]:
            self.notes.append(f"{self.dist} {self.version} installed (the issue measured {PEER_VERSIONS[self.dist]})")

    def start(self, urls: list[str]) -> None:  # type: ignore[override]
        self.urls = list(urls)
        if self.policy == "kv_aware":
            if not self.cluster.event_ports:
                raise PeerUnavailable("kv_aware needs the simulators' KV events (started without them)")
            self.extra = ["--kv-event-block-size", str(self.cluster.settings.block_size), "--kv-event-model", MODEL]
            for url in urls:
                self.extra += ["--kv-event-source", f"{url}=tcp://127.0.0.1:{self.cluster.event_ports[url]}"]
        super().start(timeout_s=90.0)
        if self.policy == "kv_aware":
            time.sleep(1.5)  # ZeroMQ subscriptions settle (events sent before are lost)

    def add_worker(self, url: str) -> str:
        """Register a new replica through the router's API (both have one; the forms differ)."""
        attempts = (("POST", "/workers", {"url": url}), ("POST", f"/add_worker?url={url}", None))
        if self.kind != "sglang":
            attempts = attempts[::-1]
        answers = []
        for method, path, body in attempts:
            try:
                status, text = _http(method, self.base + path, body, timeout=30)
            except OSError as exc:
                answers.append(f"{path}: {exc}")
                continue
            if status < 300:
                if self.policy == "kv_aware":
                    self.notes.append("the added replica has no KV event source (vllm-router takes them only at start)")
                return f"{path} -> {status}"
            answers.append(f"{path} -> {status} {text[:100]!r}")
        self.notes.append(f"could not add the new replica: {'; '.join(answers)}")
        return "; ".join(answers)


# --------------------------------------------------------------------------------------
# The client: one streamed chat
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    sent: float  # seconds after the trace start
    ok: bool
    ttft: float | None
    e2e: float
    error: str = ""
    group: int | None = None
    content: str = ""
    replica: str | None = None  # x-gateway-replica (the gateway says who served it)


async def stream_chat(session: Any, url: str, headers: dict[str, str], body: bytes, t0: float,
                      group: int | None, keep_content: bool) -> Outcome:
    import aiohttp

    perf = time.perf_counter
    start = perf()
    ttft = None
    done = False
    error = ""
    parts: list[str] = []
    replica = None
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            replica = resp.headers.get("x-gateway-replica")
            if resp.status != 200:
                await resp.read()
                return Outcome(start - t0, False, None, perf() - start, f"HTTP {resp.status}", group, "", replica)
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    # Read on to the end of the body, as SDK clients do: leaving early closes
                    # the connection under the router, which counts the stream as abandoned
                    # by its client (Serve logs a 499) and may not learn from it.
                    done = True
                    continue
                if ttft is None:
                    ttft = perf() - start
                if b'"error"' in data[:20]:
                    try:
                        err = json.loads(data).get("error") or {}
                        error = f"stream error {err.get('code') or err.get('type') or ''}".strip()
                    except ValueError:
                        error = "stream error"
                    continue
                if keep_content:
                    try:
                        choices = json.loads(data).get("choices") or []
                    except ValueError:
                        continue
                    if choices:
                        piece = (choices[0].get("delta") or {}).get("content")
                        if piece:
                            parts.append(piece)
    except asyncio.CancelledError:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        error = "timeout"
    except aiohttp.ClientError as exc:
        error = type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - every failure is counted
        error = type(exc).__name__
    e2e = perf() - start
    if not error and not done:
        error = "no [DONE]"
    return Outcome(start - t0, not error, ttft if not error else None, e2e, error, group, "".join(parts), replica)


def chat_body(messages: list[dict[str, str]], max_tokens: int) -> bytes:
    return json.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


class Route:
    """Where the client sends a request, and what happens to the path on churn."""

    name = ""

    def target(self, req_key: int | None) -> tuple[str, dict[str, str]]:
        raise NotImplementedError

    def on_kill(self, victim: SimulatorProcess) -> str:
        return ""

    def on_add(self, sim: SimulatorProcess) -> str:
        return ""


class HandPath(Route):
    """Each group/conversation to a fixed replica; a killed replica's groups go to the next
    live one, and to the new replica once it is added."""

    def __init__(self, cluster: Cluster) -> None:
        self.name = "hand"
        self.slots = [s.url for s in cluster.base]
        self.live = list(self.slots)
        self._rr = 0

    def target(self, key: int | None) -> tuple[str, dict[str, str]]:
        if key is None:
            self._rr += 1
            url = self.live[self._rr % len(self.live)]
        else:
            url = self.slots[key % len(self.slots)]
        return url + CHAT_PATH, {"content-type": "application/json"}

    def on_kill(self, victim: SimulatorProcess) -> str:
        self.live = [u for u in self.live if u != victim.url]
        i = self.slots.index(victim.url)
        self.slots[i] = self.live[i % len(self.live)]
        self._killed_slot = i
        return f"hand: slot {i} -> {self.slots[i]}"

    def on_add(self, sim: SimulatorProcess) -> str:
        self.live.append(sim.url)
        i = getattr(self, "_killed_slot", 0)
        self.slots[i] = sim.url
        return f"hand: slot {i} -> {sim.url}"


class GatewayPath(Route):
    def __init__(self, name: str, router: str, bases: list[str]) -> None:
        self.name = name
        self.router = router
        self.urls = [b + CHAT_PATH for b in bases]
        self._rr = 0
        self.headers = {"content-type": "application/json", ROUTER_HEADER: router}

    def target(self, key: int | None) -> tuple[str, dict[str, str]]:
        self._rr += 1
        return self.urls[self._rr % len(self.urls)], self.headers


class PeerPath(Route):
    def __init__(self, name: str, peer: PeerRouter) -> None:
        self.name = name
        self.peer = peer
        self.url = peer.base + CHAT_PATH
        self.headers = {"content-type": "application/json"}

    def target(self, key: int | None) -> tuple[str, dict[str, str]]:
        return self.url, self.headers

    def on_add(self, sim: SimulatorProcess) -> str:
        return f"{self.name}: add_worker {self.peer.add_worker(sim.url)}"


# --------------------------------------------------------------------------------------
# Replaying a trace through a path
# --------------------------------------------------------------------------------------


async def replay(trace: Trace, path: Route, cluster: Cluster, args: argparse.Namespace) -> tuple[list[Outcome], list[str], float]:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=args.request_timeout),
        auto_decompress=False,
    )
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome] = []
    notes: list[str] = []
    t0 = time.perf_counter() + 0.1
    start_loop = loop.time() + 0.1

    async def at(offset: float) -> None:
        delay = start_loop + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def one(req: Req) -> None:
        await at(req.at)
        url, headers = path.target(req.key)
        outcomes.append(await stream_chat(session, url, headers, chat_body(req.messages, req.max_tokens), t0, req.group, False))

    async def conversation(conv: Conversation) -> None:
        await at(conv.start)
        messages = [{"role": "system", "content": conv.system}]
        for i, turn in enumerate(conv.turns):
            messages.append({"role": "user", "content": turn})
            url, headers = path.target(conv.key)
            out = await stream_chat(session, url, headers, chat_body(messages, conv.max_tokens), t0, conv.key, True)
            outcomes.append(out)
            # A failed turn still continues the chat, with a stand-in answer of the same length.
            answer = out.content if out.ok and out.content else " ".join(["err"] * conv.max_tokens)
            messages.append({"role": "assistant", "content": answer})
            await asyncio.sleep(conv.think[i])

    async def event(offset: float, what: str) -> None:
        await at(offset)
        if what == "kill":
            victim = await asyncio.to_thread(cluster.kill, 0)
            notes.append(f"{time.perf_counter() - t0:5.1f}s SIGKILL {victim.url}")
            note = path.on_kill(victim)
        else:
            sim = await asyncio.to_thread(cluster.add_spare)
            notes.append(f"{time.perf_counter() - t0:5.1f}s started {sim.url}")
            note = await asyncio.to_thread(path.on_add, sim)
        if note:
            notes.append(f"{time.perf_counter() - t0:5.1f}s {note}")

    gc.collect()
    try:
        await asyncio.gather(
            *(one(r) for r in trace.requests),
            *(conversation(c) for c in trace.conversations),
            *(event(o, w) for o, w in trace.events),
        )
    finally:
        await session.close()
    wall = max((o.sent + o.e2e for o in outcomes), default=0.0)
    return outcomes, notes, wall


def run_trace(trace: Trace, path: Route, cluster: Cluster, args: argparse.Namespace) -> tuple[list[Outcome], list[str], float]:
    kwargs = {}
    try:
        import uvloop

        kwargs["loop_factory"] = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(**kwargs) as runner:
        return runner.run(replay(trace, path, cluster, args))


def summarize(outcomes: list[Outcome], wall: float, sims: dict[str, dict[str, float]], cpu: dict[str, float],
              router_groups: tuple[str, ...]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    hits = sum(s.get("prefix_hits_tokens", 0.0) for s in sims.values())
    queries = sum(s.get("prefix_queries_tokens", 0.0) for s in sims.values())
    completed = {url: int(s.get("completed_total", 0)) for url, s in sims.items()}
    gen = sum(s.get("generation_tokens_total", 0.0) for s in sims.values())
    router_cpu = sum(cpu.get(g, 0.0) for g in router_groups) if cpu else None
    # Where each group went (the gateway names the replica; the others don't).
    by_group: dict[int, Counter] = {}
    for o in ok:
        if o.replica and o.group is not None:
            by_group.setdefault(o.group, Counter())[o.replica] += 1
    placed = sum(sum(c.values()) for c in by_group.values())
    stick = round(sum(max(c.values()) for c in by_group.values()) / placed, 3) if placed else None
    replica_order = sorted({r for c in by_group.values() for r in c})
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "error_kinds": dict(Counter(o.error for o in outcomes if not o.ok).most_common(4)),
        "ttft_p50_ms": ms(percentile(ttfts, 0.50)),
        "ttft_p90_ms": ms(percentile(ttfts, 0.90)),
        "ttft_p99_ms": ms(percentile(ttfts, 0.99)),
        "e2e_p50_ms": ms(percentile([o.e2e for o in ok], 0.50)),
        "group0_ttft_p99_ms": ms(percentile([o.ttft for o in ok if o.group == 0 and o.ttft is not None], 0.99)),
        "done_per_s": round(len(ok) / wall, 2) if wall > 0 else None,
        "wall_s": round(wall, 2),
        "hit_rate": round(hits / queries, 3) if queries else None,
        "hit_tokens": hits,
        "query_tokens": queries,
        "completed_by_replica": completed,
        "generated_tokens_per_ok": round(gen / len(ok), 1) if ok else None,
        "preemptions": sum(int(s.get("preemptions_total", 0)) for s in sims.values()),
        "sim_busy_s": round(sum(s.get("busy_seconds_total", 0.0) for s in sims.values()), 2),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()} if cpu else {},
        "group_stickiness": stick,
        "group_placement": {g: [c.get(r, 0) for r in replica_order] for g, c in sorted(by_group.items())},
        "timeline": [(round(o.sent, 2), o.group, o.replica and replica_order.index(o.replica) if o.replica in replica_order else None,
                      None if o.ttft is None else round(o.ttft * 1000, 1)) for o in sorted(outcomes, key=lambda o: o.sent)],
        "router_cpu_ms_per_req": round(1000 * router_cpu / len(ok), 3) if router_cpu is not None and ok and router_groups else None,
    }


# Figures that --repeat reports as the median over rounds (with their range).
MEDIAN_KEYS = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "e2e_p50_ms", "done_per_s", "hit_rate", "precision",
               "router_cpu_ms_per_req", "router_idle_pct", "index_entries", "index_bytes", "group_stickiness",
               "prompt_estimate_ratio")


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's rounds as one result: medians of the figures, sums of the counts, the last
    round's details, and every round under `rounds`."""
    if len(runs) == 1:
        return runs[0]
    good = [r for r in runs if r.get("ok_run")]
    if not good:
        return {**runs[-1], "rounds": runs}
    out = dict(good[-1])
    for key in MEDIAN_KEYS:
        values = sorted(r[key] for r in good if r.get(key) is not None)
        if values:
            mid = len(values) // 2
            if len(values) % 2:
                out[key] = values[mid]
            else:
                avg = (values[mid - 1] + values[mid]) / 2
                out[key] = round(avg) if all(isinstance(v, int) for v in values) else round(avg, 3)
            out[f"{key}_range"] = [values[0], values[-1]]
    for key in ("requests", "ok", "errors"):
        out[key] = sum(r.get(key, 0) for r in good)
    kinds: Counter = Counter()
    for r in good:
        kinds.update(r.get("error_kinds") or {})
    out["error_kinds"] = dict(kinds.most_common(4))
    out["notes"] = [n for i, r in enumerate(good) for n in ([f"round {i + 1}: {x}" for x in r.get("notes", [])])]
    out["rounds"] = runs
    out["rounds_ok"] = len(good)
    return out


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cluster: Cluster | None = None
        self.stack: GatewayStack | None = None
        self.peer: PeerRouter | None = None
        self.results: dict[str, Any] = {"workloads": {}}

    def run(self) -> dict[str, Any]:
        args = self.args
        if not args.skip_decision:
            self.results["decision"] = time_decisions(args)
        flags = simulator_flags()
        kv = any(p in args.paths for p in ("vllm-router:kv_aware", "gateway-kv:cache_aware", "gateway4-kv:cache_aware"))
        settings = sim_settings(args, flags, kv)
        self.results["simulator"] = {"args": settings.args, "description": settings.description, "blocks": settings.blocks}
        log(f"simulators: {settings.description}")
        self.cluster = Cluster(args, settings, spare="churn" in args.workloads)
        self.cluster.start()
        if any(p.startswith("gateway") for p in args.paths):
            self.stack = GatewayStack(args)
            self.stack.start()
        for name in args.workloads:
            trace = BUILDERS[name](args)
            log(f"===== workload {name}: {trace.title}")
            wl = {"title": trace.title, "size": trace.size, "info": trace.info, "paths": {}}
            self.results["workloads"][name] = wl
            runs: dict[str, list[dict[str, Any]]] = {p: [] for p in args.paths}
            for rep in range(args.repeat):
                if args.repeat > 1:
                    log(f"{name}: round {rep + 1} of {args.repeat}")
                for path_name in args.paths:  # rounds interleave, so noise hits every path alike
                    runs[path_name].append(self.run_path(trace, path_name))
                    wl["paths"][path_name] = combine_runs(runs[path_name])
            if self.stack:
                self.stack.delete()
        return self.results

    def run_path(self, trace: Trace, path_name: str) -> dict[str, Any]:
        args, cluster = self.args, self.cluster
        assert cluster is not None
        result: dict[str, Any] = {"path": path_name}
        kind, _, policy = path_name.partition(":")
        t_setup = time.monotonic()
        try:
            cluster.restore()
            urls = [s.url for s in cluster.base]
            all_urls = [s.url for s in cluster.all]
            path: Route
            cpu_groups: dict[str, list[int]] = {"client": [os.getpid()]}
            router_groups: tuple[str, ...] = ()
            if kind == "hand":
                if self.stack:
                    self.stack.delete()
                result["cold"] = cluster.make_cold()
                path = HandPath(cluster)
            elif kind in GATEWAY_KINDS:
                assert self.stack is not None
                ingress = args.many_ingress if kind.startswith("gateway4") else 1
                precise = kind.endswith("-kv")
                if self.stack.deployed != (ingress, tuple(all_urls), precise) or policy == "cache_aware":
                    # A fresh gateway for each cache_aware run: its index and latency model start cold too.
                    self.stack.deploy(ingress, all_urls, precise)
                result["cold"] = cluster.make_cold()
                self.stack.wait_ready(set(urls), ingress, event_seqs=cluster.event_seqs() if precise else None)
                path = GatewayPath(path_name, policy, self.stack.bases)
                pids = self.stack.pids()
                cpu_groups.update({k: v for k, v in pids.items() if v})
                router_groups = tuple(k for k in ("proxy", "ingress", "health") if pids.get(k))
                result["router_processes"] = {k: len(v) for k, v in pids.items()}
                before = self.stack.routing_counters()
            else:
                if self.stack:
                    self.stack.delete()
                result["cold"] = cluster.make_cold()
                self.peer = PeerRouter(kind, policy, cluster, args)
                self.peer.start(urls)
                path = PeerPath(path_name, self.peer)
                cpu_groups["router"] = self.peer.pids()
                router_groups = ("router",)
                result["rss_start_mb"] = round((rss_bytes(self.peer.pids()) or 0) / 2**20, 1)
            cpu_groups["sims"] = cluster.pids()
            if router_groups and args.idle_s > 0:
                # What the router burns with no traffic (probes, scrapes, long-polls, pushes):
                # at a low request rate it is much of the CPU per request.
                idle = CpuMeter({g: cpu_groups[g] for g in router_groups})
                i0 = idle.read()
                time.sleep(args.idle_s)
                d = CpuMeter.delta(i0, idle.read())
                result["router_idle_pct"] = round(100 * sum(d.get(g, 0.0) for g in router_groups) / args.idle_s, 1)
            result["setup_s"] = round(time.monotonic() - t_setup, 1)
            cluster.begin()
            meter = CpuMeter(cpu_groups)
            cpu0 = meter.read()
            log(f"{trace.name}: {path_name} ({trace.size} requests)")
            outcomes, notes, wall = run_trace(trace, path, cluster, args)
            cpu = CpuMeter.delta(cpu0, meter.read())
            sims = cluster.totals()
            result.update(summarize(outcomes, wall, sims, cpu, router_groups))
            result["notes"] = notes
            result["ok_run"] = True
            if kind in GATEWAY_KINDS:
                assert self.stack is not None
                time.sleep(1.6)  # every ingress replica pushes its counters once a second
                after = self.stack.routing_counters()
                pred = after.get("predicted_cached", 0.0) - before.get("predicted_cached", 0.0)
                est = after.get("prompt_tokens", 0.0) - before.get("prompt_tokens", 0.0)
                result["predicted_cached_tokens"] = pred
                result["estimated_prompt_tokens"] = est
                if policy == "cache_aware":
                    hits = result["hit_tokens"]
                    result["precision"] = round(pred / hits, 3) if hits else None
                    result["prompt_estimate_ratio"] = round(est / result["query_tokens"], 3) if result["query_tokens"] else None
                    per = self.stack.index_stats(ingress)
                    result["index_mode"] = self.stack.index_mode()
                    result["index"] = per
                    if per:
                        streams = [st for v in per.values() for st in v["kv_events"].values()]
                        if streams:
                            result["kv_event_streams"] = {
                                k: sum(st.get(k) or 0 for st in streams)
                                for k in ("batches", "replays", "replayed_batches", "restarts_seen", "unknown_parents")}
                            errors = sorted({st["last_error"] for st in streams if st.get("last_error")})
                            if errors:
                                result.setdefault("notes", []).append(f"KV event streams' last errors: {'; '.join(errors)[:200]}")
                            if result["kv_event_streams"]["unknown_parents"]:
                                result.setdefault("notes", []).append(
                                    f"{result['kv_event_streams']['unknown_parents']} stored block batches had a parent the "
                                    "gateway never saw (could not be keyed)")
                        result["index_entries"] = max(v["entries"] or 0 for v in per.values())
                        result["index_bytes"] = max(v["bytes"] or 0 for v in per.values())
                        result["index_max_entries"] = max(v["max_entries"] or 0 for v in per.values())
                        result["index_ingress_seen"] = len(per)
            if self.peer is not None:
                result["rss_end_mb"] = round((rss_bytes(self.peer.pids()) or 0) / 2**20, 1)
                result["peer_notes"] = self.peer.notes
                result["version"] = installed_version("sglang-router" if kind == "sglang" else "vllm-router")
            log(f"  {path_name}: ok {result['ok']}/{result['requests']}, TTFT p50 {result['ttft_p50_ms']} "
                f"p90 {result['ttft_p90_ms']} p99 {result['ttft_p99_ms']} ms, hit rate {result['hit_rate']}, "
                f"{result['done_per_s']}/s, router CPU {result['router_cpu_ms_per_req']} ms/req")
        except PeerUnavailable as exc:
            result.update(ok_run=False, error=str(exc))
            log(f"  {path_name}: cannot run here: {exc}")
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one path failing must not end the run
            result.update(ok_run=False, error=f"{type(exc).__name__}: {exc}")
            log(f"  {path_name} failed: {exc!r}")
        finally:
            if self.peer is not None:
                self.peer.stop()
                self.peer = None
        return result

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop()
        if self.stack is not None:
            self.stack.stop()
        if self.cluster is not None:
            self.cluster.stop()


# --------------------------------------------------------------------------------------
# The routing decision, in-process: CacheAwareRouter.choose over 100 synthetic candidates
# --------------------------------------------------------------------------------------


def time_decisions(args: argparse.Namespace) -> dict[str, Any]:
    from routers import Candidate, PrefixIndex, RoutingFacts
    from routers.cache_aware import CacheAwareRouter
    from routers.prefix import render_messages, text_blocks

    rng = random.Random(args.seed)
    out: dict[str, Any] = {}
    for n in sorted({args.replicas, args.decision_candidates}):
        index = PrefixIndex(1 << 18)
        router = CacheAwareRouter(index)
        cache_tokens = 4352
        candidates = [
            Candidate(replica_id=f"http://10.0.{i // 200}.{i % 200 + 1}:8000", url=f"http://10.0.{i // 200}.{i % 200 + 1}:8000",
                      running=rng.randint(0, 4), waiting=rng.randint(0, 2), inflight=rng.randint(0, 3),
                      load_age_s=0.1, scraped_inflight=0, slots=4, cache_tokens=cache_tokens)
            for i in range(n)
        ]
        systems = [words(rng, args.prompt_words) for _ in range(max(8, n // 2))]

        def facts_for(system: str) -> RoutingFacts:
            text = render_messages([{"role": "system", "content": system}, {"role": "user", "content": words(rng, args.user_words)}])
            blocks = text_blocks(text)
            return RoutingFacts(model=MODEL, blocks=tuple(blocks), block_tokens=16, prompt_tokens=len(text) // 4,
                                affinity_key=blocks[0] & 0xFFFFFFFF)

        # Warm the index: every prompt placed on a few replicas, as traffic would.
        for s in systems:
            f = facts_for(s)
            for c in rng.sample(candidates, min(3, n)):
                router.placed(f, c)
        samples = [facts_for(rng.choice(systems)) for _ in range(200)]
        timings: list[float] = []
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                for f in samples:
                    t = time.perf_counter_ns()
                    router.choose(f, candidates)
                    timings.append((time.perf_counter_ns() - t) / 1000)
            # CPU time per call over whole batches, best of 5: what a decision costs when the
            # process has a core (wall times on a shared 2-core box include waiting for one).
            cpu_us = []
            for _ in range(5):
                t = time.thread_time_ns()
                for f in samples:
                    router.choose(f, candidates)
                cpu_us.append((time.thread_time_ns() - t) / len(samples) / 1000)
        finally:
            gc.enable()
        text = render_messages([{"role": "system", "content": systems[0]}, {"role": "user", "content": words(rng, args.user_words)}])
        t = time.perf_counter_ns()
        for _ in range(50):
            text_blocks(text)
        hash_us = (time.perf_counter_ns() - t) / 50 / 1000
        out[str(n)] = {
            "candidates": n,
            "p50_us": round(percentile(timings, 0.5), 1),
            "p99_us": round(percentile(timings, 0.99), 1),
            "mean_us": round(sum(timings) / len(timings), 1),
            "cpu_us": round(min(cpu_us), 1),
            "prompt_blocks": len(samples[0].blocks),
            "hash_prompt_us": round(hash_us, 1),
            "index_entries": len(index),
        }
    return out


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _f(value: Any, width: int, digits: int = 1) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        text = f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return text.rjust(width)


def _index_text(p: dict[str, Any]) -> str:
    if p.get("index_entries") is not None:
        return f"{p['index_entries']:,} ent {p['index_bytes'] / 2**20:.1f}MB" + (
            f" x{p['index_ingress_seen']}" if p.get("index_ingress_seen", 1) > 1 else "")
    if p.get("rss_end_mb") is not None:
        return f"RSS {p['rss_end_mb']:.0f}MB (+{p['rss_end_mb'] - p.get('rss_start_mb', 0):.0f})"
    return "-"


def _spread(p: dict[str, Any]) -> str:
    counts = list((p.get("completed_by_replica") or {}).values())
    total = sum(counts)
    return "/".join(f"{round(100 * c / total)}" for c in counts) if total else "-"


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    sim = results.get("simulator", {})
    lines.append("=" * 158)
    lines.append(f"ROUTING BENCHMARK  {args.replicas} simulated replicas: {sim.get('description', '')}")
    src = (results.get("meta") or {}).get("source") or {}
    if src:
        lines.append(f"  code: {src.get('repo')} at {src.get('commit')}"
                     + (f" + uncommitted changes in {len(src['dirty'])} file(s) of {', '.join(sorted({d.split('/')[0] for d in src['dirty']}))}"
                        if src.get("dirty") else ""))
    lines.append(f"  gateway: Ray Serve {args.mode} ingress, health {args.gateway_health}; peers: "
                 + ", ".join(f"{d} {installed_version(d) or 'not installed'}" for d in PEER_VERSIONS)
                 + f"; cold caches by {args.cold}; seed {args.seed}")
    head = (f"{'path':24s}{'ok':>5s}{'err':>5s}{'TTFT p50':>10s}{'p90':>8s}{'p99':>8s}{'x hand':>8s}{'e2e p50':>9s}"
            f"{'done/s':>8s}{'hit rate':>9s}{'pred/act':>9s}{'rtr CPU':>9s}{'idle %':>7s}  {'index / memory':24s}{'spread %':16s}")
    for name, wl in results.get("workloads", {}).items():
        lines.append("=" * 158)
        lines.append(f"WORKLOAD {name}: {wl['title']}")
        lines.append("-" * 158)
        lines.append(head)
        hand = wl["paths"].get("hand", {})
        for pname, p in wl["paths"].items():
            if not p.get("ok_run"):
                lines.append(f"{pname:24s} DID NOT RUN: {str(p.get('error'))[:160]}")
                continue
            ratio = (round(p["ttft_p50_ms"] / hand["ttft_p50_ms"], 2)
                     if hand.get("ttft_p50_ms") and p.get("ttft_p50_ms") and pname != "hand" else None)
            lines.append(
                f"{pname:24s}{_f(p['ok'], 5)}{_f(p['errors'], 5)}{_f(p['ttft_p50_ms'], 10)}{_f(p['ttft_p90_ms'], 8)}"
                f"{_f(p['ttft_p99_ms'], 8)}{_f(ratio, 8, 2)}{_f(p['e2e_p50_ms'], 9)}{_f(p['done_per_s'], 8, 2)}"
                f"{_f(p['hit_rate'], 9, 3)}{_f(p.get('precision'), 9, 2)}{_f(p['router_cpu_ms_per_req'], 9, 2)}{_f(p.get('router_idle_pct'), 7, 1)}  "
                f"{_index_text(p):24s}{_spread(p):16s}"
                + (f" {p['error_kinds']}" if p["errors"] else "")
            )
            if p.get("rounds"):
                hr, p90 = p.get("hit_rate_range"), p.get("ttft_p90_ms_range")
                lines.append(f"{'':24s}  median of {p.get('rounds_ok')} rounds; hit rate {hr[0]:.3f}-{hr[1]:.3f}" if hr else "")
                if p90:
                    lines[-1] += f", TTFT p90 {p90[0]:,.0f}-{p90[1]:,.0f} ms"
                p50 = p.get("ttft_p50_ms_range")
                if p50:
                    lines[-1] += f", p50 {p50[0]:,.0f}-{p50[1]:,.0f} ms"
        notes = [(pname, n) for pname, p in wl["paths"].items() for n in p.get("notes", []) + p.get("peer_notes", [])]
        for pname, note in notes:
            lines.append(f"  note {pname}: {note}")
        gens = {pname: p.get("generated_tokens_per_ok") for pname, p in wl["paths"].items() if p.get("ok_run")}
        known = [g for g in gens.values() if g is not None]
        if known and max(known) > 1.02 * min(known):
            lines.append(f"  generated tokens per request differ between paths: {gens}")
        if name == "shared_prefix":
            lines.append("  the issue's reference run (older simulator, prefill not shared by an engine step), for comparison:")
            for label, p50, p90, hr in ISSUE_REFERENCE:
                lines.append(f"    {label:38s} TTFT p50 {p50:4d}  p90 {p90:4d}  hit rate {hr:.2f}")
    dec = results.get("decision") or {}
    if dec:
        lines.append("=" * 158)
        lines.append("ROUTING DECISION in-process: CacheAwareRouter.choose (prefix index warm: every prompt on 3 replicas; "
                     f"prompt of {next(iter(dec.values()))['prompt_blocks']} blocks); wall time of 600 single calls, "
                     "CPU time per call (best of 5 batches of 200)")
        for d in dec.values():
            lines.append(f"  {d['candidates']:4d} candidates: CPU {d['cpu_us']:7.1f} us/call   wall p50 {d['p50_us']:7.1f} us  "
                         f"p99 {d['p99_us']:7.1f} us  mean {d['mean_us']:7.1f} us   (+ hashing the prompt into blocks, once per "
                         f"request in the parser: {d['hash_prompt_us']:.1f} us)")
    lines.append("=" * 158)
    lines.append("TARGETS (cache_aware = gateway:cache_aware unless said)")
    lines.append(f"{'target':74s}{'figure':>50s}{'bound':>22s}   result")
    for t in results.get("targets", []):
        lines.append(f"{t['target']:74s}{t['figure']:>50s}{t['bound']:>22s}   {t['result']}")
    lines.append("=" * 158)
    return "\n".join(lines)


def evaluate_targets(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, str]]:
    wls = results.get("workloads", {})
    out: list[dict[str, str]] = []

    def get(wl: str, path: str) -> dict[str, Any] | None:
        p = wls.get(wl, {}).get("paths", {}).get(path)
        return p if p and p.get("ok_run") else None

    def add(target: str, figure: str, bound: str, met: bool | None, why: str = "") -> None:
        out.append({"target": target, "figure": figure, "bound": bound,
                    "result": ("met" if met else "NOT MET") if met is not None else f"not measured{': ' + why if why else ''}"})

    ca = get("shared_prefix", "gateway:cache_aware")
    hand = get("shared_prefix", "hand")
    lr = get("shared_prefix", "gateway:least_request")
    sg = get("shared_prefix", "sglang:cache_aware")
    if ca:
        add("shared_prefix: hit rate >= 0.9", f"{ca['hit_rate']}", ">= 0.90", (ca["hit_rate"] or 0) >= 0.9)
    else:
        add("shared_prefix: hit rate >= 0.9", "-", ">= 0.90", None, "no gateway:cache_aware run")
    for q in ("p50", "p90"):
        key = f"ttft_{q}_ms"
        if ca and hand and ca.get(key) and hand.get(key):
            add(f"shared_prefix: TTFT {q} within 1.3x of hand", f"{ca[key]} vs hand {hand[key]} ms ({ca[key] / hand[key]:.2f}x)",
                f"<= {1.3 * hand[key]:.1f} ms", ca[key] <= 1.3 * hand[key])
        else:
            add(f"shared_prefix: TTFT {q} within 1.3x of hand", "-", "", None, "needs hand and gateway:cache_aware")
    if ca and lr and ca.get("ttft_p50_ms") and lr.get("ttft_p50_ms"):
        add("shared_prefix: TTFT p50 >= 5x lower than least_request",
            f"{ca['ttft_p50_ms']} vs {lr['ttft_p50_ms']} ms ({lr['ttft_p50_ms'] / ca['ttft_p50_ms']:.1f}x)",
            f"<= {lr['ttft_p50_ms'] / 5:.1f} ms", ca["ttft_p50_ms"] * 5 <= lr["ttft_p50_ms"])
    else:
        add("shared_prefix: TTFT p50 >= 5x lower than least_request", "-", "", None, "needs gateway:least_request")
    if ca and sg and ca.get("ttft_p90_ms") and sg.get("ttft_p90_ms"):
        add("shared_prefix: TTFT p90 better than sglang-router", f"{ca['ttft_p90_ms']} vs {sg['ttft_p90_ms']} ms",
            f"< {sg['ttft_p90_ms']} ms", ca["ttft_p90_ms"] < sg["ttft_p90_ms"])
    else:
        why = wls.get("shared_prefix", {}).get("paths", {}).get("sglang:cache_aware", {}).get("error", "sglang path not run")
        add("shared_prefix: TTFT p90 better than sglang-router", "-", "", None, str(why)[:60])
    zc, zl = get("zipf", "gateway:cache_aware"), get("zipf", "gateway:least_request")
    if zc and zl and zc.get("ttft_p99_ms") and zl.get("ttft_p99_ms"):
        add("zipf: TTFT p99 no worse than least_request", f"{zc['ttft_p99_ms']} vs {zl['ttft_p99_ms']} ms",
            f"<= {zl['ttft_p99_ms']} ms", zc["ttft_p99_ms"] <= zl["ttft_p99_ms"])
    else:
        add("zipf: TTFT p99 no worse than least_request", "-", "", None, "needs zipf with cache_aware and least_request")
    nc, nl = get("no_sharing", "gateway:cache_aware"), get("no_sharing", "gateway:least_request")
    if nc and nl:
        for key, label in (("ttft_p50_ms", "TTFT p50"), ("ttft_p90_ms", "TTFT p90")):
            if nc.get(key) and nl.get(key):
                add(f"no_sharing: {label} within 5% of least_request", f"{nc[key]} vs {nl[key]} ms ({nc[key] / nl[key]:.2f}x)",
                    f"<= {1.05 * nl[key]:.1f} ms", nc[key] <= 1.05 * nl[key])
        if nc.get("done_per_s") and nl.get("done_per_s"):
            add("no_sharing: completed/s within 5% of least_request", f"{nc['done_per_s']} vs {nl['done_per_s']}/s",
                f">= {0.95 * nl['done_per_s']:.2f}/s", nc["done_per_s"] >= 0.95 * nl["done_per_s"])
    else:
        add("no_sharing: within 5% of least_request", "-", "", None, "needs no_sharing with cache_aware and least_request")
    g4 = get("shared_prefix", "gateway4:cache_aware")
    if ca and g4 and ca.get("hit_rate") and g4.get("hit_rate") is not None:
        add(f"shared_prefix: {args.many_ingress} ingress replicas' hit rate within 10% of one's",
            f"{g4['hit_rate']} vs {ca['hit_rate']}", f">= {0.9 * ca['hit_rate']:.3f}", g4["hit_rate"] >= 0.9 * ca["hit_rate"])
    else:
        add(f"shared_prefix: {args.many_ingress} ingress replicas' hit rate within 10% of one's", "-", "", None,
            "needs gateway4:cache_aware")
    k1, k4 = get("shared_prefix", "gateway-kv:cache_aware"), get("shared_prefix", "gateway4-kv:cache_aware")
    if k1 and k4 and k1.get("hit_rate") and k4.get("hit_rate") is not None:
        add(f"shared_prefix, precise mode: {args.many_ingress} ingress replicas' hit rate within 10% of one's",
            f"{k4['hit_rate']} vs {k1['hit_rate']}", f">= {0.9 * k1['hit_rate']:.3f}", k4["hit_rate"] >= 0.9 * k1["hit_rate"])
    # The index is bounded by its configured entry limit (routing.max_index_blocks); in
    # approximate mode, with the replicas' cache sizes known, also by those caches (each
    # replica's LRU holds at most its cache's blocks). Precise mode trusts the replicas'
    # eviction events instead, so only the configured limit applies there.
    sim_blocks = (results.get("simulator") or {}).get("blocks") or 0
    runs = [(wl, pn, p) for wl, w in wls.items() for pn, p in w["paths"].items()
            if p.get("ok_run") and p.get("index_entries") is not None]
    if runs:
        wl_, pn_, worst = max(runs, key=lambda r: r[2]["index_entries"])
        add("index memory bounded (entries <= routing.max_index_blocks)",
            f"{worst['index_entries']:,} entries, {worst['index_bytes'] / 2**20:.2f} MB ({wl_}, {pn_})",
            f"<= {worst['index_max_entries']:,} entries", worst["index_entries"] <= worst["index_max_entries"])
        approx = [r for r in runs if "-kv" not in r[1]]
        if approx and sim_blocks:
            wl_, pn_, worst = max(approx, key=lambda r: r[2]["index_entries"])
            cap = sim_blocks * (args.replicas + (1 if "churn" in wls else 0))
            add("approximate index within the replicas' caches (entries <= their blocks)",
                f"{worst['index_entries']:,} entries ({wl_}, {pn_})", f"<= {cap:,} entries", worst["index_entries"] <= cap)
    else:
        add("index memory bounded", "-", "", None, "no gateway:cache_aware run")
    dec = (results.get("decision") or {}).get(str(args.decision_candidates))
    if dec:
        add(f"routing decision < 50 us at {args.decision_candidates} replicas (choose, CPU/call)",
            f"{dec['cpu_us']} us (wall p50 {dec['p50_us']})", "< 50 us", dec["cpu_us"] < 50)
    return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

FULL_SIZES = {"shared_prefix": 405, "zipf": 240, "no_sharing": 160, "churn": 240}
QUICK_SIZES = {"shared_prefix": 100, "zipf": 60, "no_sharing": 40, "churn": 80}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short traces (smoke run): ~25%% of the requests")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    ap.add_argument("--paths", default="all",
                    help="comma-separated paths or groups (all, gateway, peers, sglang, vllm-router); paths: " + ", ".join(ALL_PATHS))
    ap.add_argument("--requests", type=int, default=None, help="requests per open-loop workload (default per workload)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every workload's request count")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every path (interleaved); tables show medians and the ranges of hit rate and TTFT p90")
    ap.add_argument("--replicas", type=int, default=4, help="simulated vLLM replicas (default 4)")
    ap.add_argument("--many-ingress", type=int, default=4, help="ingress replicas of the gateway4 path (default 4)")
    ap.add_argument("--mode", choices=("direct", "proxy"), default="direct",
                    help="Serve ingress: direct ingress, the ingress replica's own port (default; what the README "
                    "recommends for production), or Serve's Python HTTP proxy (adds ~35 ms TTFT and ~45 ms CPU per "
                    "stream on a 2-core box)")
    sim = ap.add_argument_group("simulated replicas")
    sim.add_argument("--slots", type=int, default=4, help="--max-num-seqs (default 4)")
    sim.add_argument("--prefill-per-token", type=float, default=0.0002, help="seconds per uncached prompt token (default 0.0002)")
    sim.add_argument("--sim-ttft", type=float, default=0.02, help="simulator --ttft: per-request delay before the engine (default 0.02)")
    sim.add_argument("--itl", type=float, default=0.01, help="simulator --itl (default 0.01)")
    sim.add_argument("--cache-prompts", type=float, default=2.0,
                     help="KV cache size in system prompts, plus room for the running requests' own tokens (default 2)")
    sim.add_argument("--num-gpu-blocks", type=int, default=None, help="KV cache blocks (overrides --cache-prompts)")
    sim.add_argument("--max-num-batched-tokens", type=int, default=None,
                     help="token budget of one engine step (default: the simulator's, 2048)")
    sim.add_argument("--cold", choices=("reset", "restart"), default="reset",
                     help="how caches are emptied before each path: POST /reset_prefix_cache (default) or restart")
    wl = ap.add_argument_group("workloads")
    wl.add_argument("--rate", type=float, default=14.0, help="arrivals/s of shared_prefix, zipf, churn (default 14)")
    wl.add_argument("--groups", type=int, default=8, help="prefix groups (default 8)")
    wl.add_argument("--prompt-words", type=int, default=2000, help="system prompt length in words = tokens (default 2000)")
    wl.add_argument("--user-words", type=int, default=40, help="question length (default 40)")
    wl.add_argument("--max-tokens", type=int, default=16, help="answer length (ignore_eos) (default 16)")
    wl.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent (default 1.2: the hot prefix gets ~43%%)")
    wl.add_argument("--zipf-max-tokens", type=int, default=64,
                    help="answer length in zipf: long enough that the hot group alone overloads one replica (default 64)")
    wl.add_argument("--unique-words", type=int, default=500, help="no_sharing prompt length (default 500)")
    wl.add_argument("--unique-rate", type=float, default=10.0, help="no_sharing arrivals/s (default 10)")
    wl.add_argument("--conversations", type=int, default=None, help="multi_turn chats (default 16, --quick 6)")
    wl.add_argument("--turns", type=int, default=None, help="turns per chat (default 6, --quick 3)")
    wl.add_argument("--conv-system-words", type=int, default=300)
    wl.add_argument("--first-user-words", type=int, default=100)
    wl.add_argument("--turn-words", type=int, default=60)
    wl.add_argument("--turn-max-tokens", type=int, default=48)
    wl.add_argument("--think-s", type=float, default=1.0, help="mean pause between a chat's turns (default 1 s)")
    wl.add_argument("--conv-spread-s", type=float, default=4.0, help="chats start within this many seconds")
    ap.add_argument("--decision-candidates", type=int, default=100, help="candidates of the in-process decision timing")
    ap.add_argument("--skip-decision", action="store_true", help="skip the in-process decision timing")
    ap.add_argument("--probe-interval", type=float, default=2.0, help="gateway health.probe_interval_s (default 2)")
    ap.add_argument("--metrics-interval", type=float, default=0.2, help="gateway health.metrics_interval_s (default 0.2)")
    ap.add_argument("--no-access-log", action="store_true", help="deploy the gateway with Serve's access log off")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--idle-s", type=float, default=2.0,
                    help="seconds the router's idle CPU is measured before each path (0: not measured)")
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="run the working tree as it is (default: a copy taken at start, see bench/README.md)")
    args = ap.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    paths: list[str] = []
    for p in (p.strip() for p in args.paths.split(",") if p.strip()):
        for q in PATH_ALIASES.get(p, [p]):
            if q not in ALL_PATHS:
                ap.error(f"unknown path {q!r}; choose from {', '.join(ALL_PATHS)} or a group")
            if q not in paths:
                paths.append(q)
    args.paths = [p for p in ALL_PATHS if p in paths]  # canonical order: hand first, fresh gateway per cache_aware
    base = QUICK_SIZES if args.quick else FULL_SIZES
    args.sizes = {k: max(8, round((args.requests or v) * args.scale)) for k, v in base.items()}
    if args.conversations is None:
        args.conversations = 6 if args.quick else 16
    if args.turns is None:
        args.turns = 3 if args.quick else 6
    args.conversations = max(1, round(args.conversations * args.scale))
    args.gateway_health = {"probe_interval_s": args.probe_interval, "metrics_interval_s": args.metrics_interval}
    return args


def meta() -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {d: installed_version(d) for d in ("ray", "aiohttp", *PEER_VERSIONS)},
        "argv": sys.argv,
        "loadavg": os.getloadavg(),
    }


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


SNAPSHOT_ENV = "BENCH_ROUTING_SNAPSHOT"
SNAPSHOT_PACKAGES = ("bench", "serve_app", "routers", "vllm_sim")


def source_info(repo: Path) -> dict[str, Any]:
    """The commit and the uncommitted changes of the tree a run measures."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain").splitlines()
             if line[3:].split("/")[0] in SNAPSHOT_PACKAGES]
    return {"repo": str(repo), "commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty}


def run_from_snapshot(argv: list[str]) -> None:
    """Copy the code under test and re-exec from the copy, so edits to the working tree
    during a long run (others work in it) cannot mix two versions of the gateway."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-src-"))
    for pkg in SNAPSHOT_PACKAGES:
        shutil.copytree(REPO / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, SNAPSHOT_ENV: str(tmp), "BENCH_ROUTING_SOURCE": json.dumps(source_info(REPO))}
    log(f"running from a snapshot of the code in {tmp} (--no-snapshot to run the working tree)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, str(tmp / "bench" / "routing.py"), *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.no_snapshot and not os.environ.get(SNAPSHOT_ENV):
        run_from_snapshot(argv)  # does not return
    bench = Bench(args)
    interrupted = False
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; printing what was measured")
    except Exception as exc:  # noqa: BLE001
        bench.results["error"] = f"{type(exc).__name__}: {exc}"
        log(f"benchmark failed: {exc!r}")
    finally:
        patient = lambda *_: log("still cleaning up, please wait")  # noqa: E731
        previous = {sig: signal.signal(sig, patient) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            bench.stop()
            log("everything this run started is stopped")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    results = bench.results
    results["targets"] = evaluate_targets(results, args)
    results["meta"] = meta()
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["source"] = json.loads(os.environ.get("BENCH_ROUTING_SOURCE") or "null") or source_info(REPO)
    snapshot = os.environ.get(SNAPSHOT_ENV)
    if snapshot and Path(snapshot) == REPO and not os.environ.get("BENCH_KEEP_LOGS"):
        shutil.rmtree(snapshot, ignore_errors=True)
    results["config"] = {k: v for k, v in vars(args).items() if k not in ("json",)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        log(f"figures written to {args.json}")
    print(render(results, args))
    if results.get("error"):
        print(f"RUN FAILED: {results['error']}")
    sys.stdout.flush()
    if interrupted:
        return 130
    return 0 if not results.get("error") else 2


if __name__ == "__main__":
    sys.exit(main())
