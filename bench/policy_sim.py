"""The routers over the simulator's engines in virtual time: policy quality without noise.

`bench/routing.py` is the real thing (Ray Serve, HTTP, simulator processes) and its
figures move from run to run on a shared machine. This replays the same seeded traces
through the same routers (`routers/`), the same request parsing
(`serve_app.ingress.parsing`), the same load-sample logic (`LoadScraper.apply`, slots
learned from queues) and the same engine model (`vllm_sim.engine.Engine`: step timing,
KV blocks, prefix cache), but in one process on an event loop whose clock is virtual:
a 30 s trace takes a few seconds of CPU and gives the same figures every time. Use it
to compare policies and tune them; confirm with `bench/routing.py`.

What it leaves out: HTTP and the gateway's own latency (~1 ms), and Serve's long-poll
delays other than the ones modelled (`--load-delay-s`, `--share-delay-s`).

    python bench/policy_sim.py                                   # shared_prefix and zipf, every policy
    python bench/policy_sim.py --workloads zipf --paths hand,cache_aware --verbose
    python bench/policy_sim.py --ingress 4                       # K ingress replicas sharing placements
    python bench/policy_sim.py --paths cache_aware,cache_aware-kv   # approximate vs precise (KV events)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from common import REPO, percentile  # noqa: F401  (REPO: puts the repo on sys.path)

import routing  # the traces and the simulator sizing, shared with the real benchmark

from routers import Candidate, PrefixIndex, build_router
from serve_app.control.load_metrics import ReplicaLoad
from serve_app.control.load_scraper import LoadScraper
from serve_app.ingress.kv_events import BlockMap
from serve_app.ingress.parsing import parse_request
from serve_app.ingress.tokenizer import SimulatorTokenizer
from vllm_sim.engine import Engine, EngineConfig
from vllm_sim.tokenizer import prompt_token_ids_for_chat

CHAT = "/v1/chat/completions"


class Publisher:
    """An engine's KV events, delivered to every ingress replica after ``delay`` seconds."""

    def __init__(self, replica_id: str, ingresses: list[Ingress], delay: float) -> None:
        self._rid = replica_id
        self._ingresses = ingresses
        self._delay = delay
        self.count = 0

    def publish(self, events: Any) -> None:
        self.count += 1
        batch = list(events)
        for ing in self._ingresses:
            if ing.precise:
                asyncio.get_running_loop().call_later(self._delay, ing.block_maps[self._rid].apply, batch)

    def close(self) -> None:
        pass

    def published(self) -> int:
        return self.count


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer instead of sleeping.

    Nothing here does real I/O, so whenever the loop would wait it is waiting for a timer:
    advance the clock by the wait and poll the selector without blocking.
    """

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        poll = self._selector.select

        def select(timeout: float | None = None) -> list[Any]:
            if timeout is not None and timeout > 0:
                self._now += timeout
            return poll(0)

        self._selector.select = select  # type: ignore[method-assign]

    def time(self) -> float:
        return self._now


@dataclass
class Result:
    path: str
    ttft: list[float] = field(default_factory=list)
    placements: list[tuple[float, int | None, int]] = field(default_factory=list)  # (at, group, replica)
    cached: list[tuple[int, int]] = field(default_factory=list)  # (predicted, found) cached tokens per request
    hits: int = 0
    queries: int = 0
    predicted: int = 0
    prefill_tokens: int = 0
    wall: float = 0.0

    def row(self) -> dict[str, Any]:
        moves, last = 0, {}
        for _, g, r in self.placements:
            if g is not None:
                moves += g in last and last[g] != r
                last[g] = r
        by_group: dict[int, Counter[int]] = defaultdict(Counter)
        for _, g, r in self.placements:
            if g is not None:
                by_group[g][r] += 1
        sticky = sum(c.most_common(1)[0][1] for c in by_group.values()) / max(1, sum(sum(c.values()) for c in by_group.values()))
        ms = [t * 1000 for t in self.ttft]
        return {
            "path": self.path, "n": len(ms),
            "p50": percentile(ms, 0.5), "p90": percentile(ms, 0.9), "p99": percentile(ms, 0.99),
            "hit": self.hits / max(1, self.queries), "pred": self.predicted / max(1, self.hits),
            "moves": moves, "sticky": sticky, "wall": self.wall,
            "slow_first_5s": sum(1 for (at, _, _), t in zip(self.placements, ms) if t > 300 and at < 5),
            "slow_after_5s": sum(1 for (at, _, _), t in zip(self.placements, ms) if t > 300 and at >= 5),
        }


class Ingress:
    """One gateway ingress replica: its router, its in-flight counts and load view.

    A path named ``<router>-kv`` is precise mode: token blocks, and the index fed by the
    engines' KV events (through the gateway's own ``BlockMap``) instead of modelled caches.
    """

    def __init__(self, path: str, replica_ids: list[str], events_only: bool = False) -> None:
        self.precise = path.endswith("-kv")
        name = path.removesuffix("-kv")
        self.index = PrefixIndex()
        self.router = build_router(name, index=self.index, model_capacity=not (self.precise and events_only))
        self.tokenizer = SimulatorTokenizer() if self.precise else None
        self.block_maps = {rid: BlockMap(rid, self.index, 16, 1 << 20) for rid in replica_ids} if self.precise else {}
        self.inflight: Counter[str] = Counter()
        self.samples: dict[str, Any] = {}
        self.scraped_inflight: dict[str, int] = {}
        self.outbox: list[tuple[str, tuple[int, ...]]] = []

    def apply_samples(self, samples: dict[str, Any]) -> None:
        for rid, s in samples.items():
            old = self.samples.get(rid)
            if old is None or old.scraped_at != s.scraped_at:
                self.scraped_inflight[rid] = self.inflight[rid]
        self.samples = dict(samples)

    def candidates(self, ids: list[str], now: float) -> list[Candidate]:
        out = []
        for rid in ids:
            s = self.samples.get(rid)
            if s is None:
                out.append(Candidate(rid, rid, inflight=self.inflight[rid]))
            else:
                out.append(Candidate(rid, rid, s.running, s.waiting, s.kv_cache_usage, self.inflight[rid],
                                     max(0.0, now - s.scraped_at), self.scraped_inflight.get(rid, 0),
                                     s.slots, s.cache_tokens))
        return out


async def run_path(path: str, trace: routing.Trace, cfg: EngineConfig, args: argparse.Namespace) -> Result:
    loop = asyncio.get_running_loop()
    ids = [f"r{i}" for i in range(args.replicas)]
    cache_tokens = cfg.num_gpu_blocks * cfg.block_size
    scraper = LoadScraper("sim", args.metrics_interval, clock=loop.time)
    hand = path == "hand"
    ingresses = [Ingress("least_request" if hand else path, ids, args.events_only) for _ in range(args.ingress)]
    engines = {
        rid: Engine(cfg, Publisher(rid, ingresses, args.event_delay_s) if ingresses[0].precise else None) for rid in ids
    }
    result = Result(path)
    stop = asyncio.Event()

    async def scrape() -> None:
        while not stop.is_set():
            scraper.apply({rid: ReplicaLoad(e.running, e.waiting, e.kv_cache_usage, cache_tokens) for rid, e in engines.items()})
            samples = scraper.current().samples
            loop.call_later(args.load_delay_s, lambda s=samples: [i.apply_samples(s) for i in ingresses])
            await asyncio.sleep(args.metrics_interval)

    async def share() -> None:
        while not stop.is_set():
            await asyncio.sleep(args.share_interval_s)
            for k, ing in enumerate(ingresses):
                batch, ing.outbox = ing.outbox, []
                for j, other in enumerate(ingresses):
                    if j != k and batch:
                        loop.call_later(args.share_delay_s, lambda o=other, b=batch: [o.router.index.add(*p) for p in b])

    async def one(n: int, req: routing.Req) -> None:
        await asyncio.sleep(max(0.0, req.at - loop.time()))
        body = routing.chat_body(req.messages, req.max_tokens)
        ing = ingresses[n % len(ingresses)]
        facts = parse_request(CHAT, body, None, tokenizer=ing.tokenizer).facts
        if hand:
            rid = ids[req.key % len(ids)] if req.key is not None else ids[n % len(ids)]
            estimate = None
        else:
            ranking = ing.router.choose(facts, ing.candidates(ids, loop.time()))
            chosen = ranking[0]
            rid = chosen.replica_id
            expected = getattr(ranking, "expected", None)
            estimate = expected[rid] if expected is not None and rid in expected else None
            placed = getattr(ing.router, "placed", None)
            if placed is not None:
                placed(facts, chosen)
                if facts.blocks and len(ingresses) > 1:
                    ing.outbox.append((rid, facts.blocks))
            if estimate is not None:
                result.predicted += estimate.cached_tokens
        result.placements.append((req.at, req.group, ids.index(rid)))
        slot = len(result.ttft)
        result.ttft.append(0.0)
        result.cached.append((0, 0))
        ing.inflight[rid] += 1
        engine = engines[rid]
        started = loop.time()
        seq = engine.submit(prompt_token_ids_for_chat(req.messages), req.max_tokens, [7 + n] * req.max_tokens)
        try:
            await engine.wait(seq, 0)
            ttft = loop.time() - started
            result.ttft[slot] = ttft
            result.cached[slot] = (estimate.cached_tokens if estimate is not None else 0, seq.cached_tokens)
            while not seq.done:
                await engine.wait(seq, seq.generated)
        finally:
            engine.release(seq)
            ing.inflight[rid] -= 1
        observe = getattr(ing.router, "observe", None)
        if observe is not None and estimate is not None:
            observe(facts, estimate, ttft, loop.time() - started)

    tasks = [asyncio.ensure_future(scrape())]
    if len(ingresses) > 1:
        tasks.append(asyncio.ensure_future(share()))
    t0 = loop.time()
    await asyncio.gather(*(one(n, r) for n, r in enumerate(trace.requests)))
    result.wall = loop.time() - t0
    stop.set()
    for t in tasks:
        t.cancel()
    for e in engines.values():
        result.hits += e.stats.prefix_hits_tokens
        result.queries += e.stats.prefix_queries_tokens
        result.prefill_tokens += e.stats.prefill_tokens_total
    return result


def simulate(path: str, trace: routing.Trace, cfg: EngineConfig, args: argparse.Namespace) -> Result:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(run_path(path, trace, cfg, args))
    finally:
        loop.close()


def herd_trace(args: argparse.Namespace) -> routing.Trace:
    """Every request shares one system prompt (production-stack #957: a shared system
    prompt must not herd all traffic onto one replica) with a unique question."""
    rng = random.Random(args.seed * 1000 + 9)
    system = routing.words(rng, 500)
    n = args.sizes["shared_prefix"]
    reqs = [routing.Req(at, [{"role": "system", "content": system}, {"role": "user", "content": routing.words(rng, rng.randint(20, 300))}],
                        None, args.max_tokens * 2, 0)
            for at in routing.poisson_times(rng, n, args.rate * 1.5)]
    return routing.Trace("herd", f"one 500-word system prompt + 20-300-word question; {n} chats at {args.rate * 1.5:g}/s",
                         requests=reqs)


BUILDERS = {**routing.BUILDERS, "herd": herd_trace}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="shared_prefix,zipf,no_sharing")
    ap.add_argument("--paths", default="hand,cache_aware,least_request")
    ap.add_argument("--ingress", type=int, default=1, help="ingress replicas sharing placements")
    ap.add_argument("--seeds", default="1", help="comma-separated trace seeds")
    ap.add_argument("--metrics-interval", type=float, default=0.2)
    ap.add_argument("--load-delay-s", type=float, default=0.02, help="scrape -> ingress (long-poll)")
    ap.add_argument("--share-interval-s", type=float, default=0.1)
    ap.add_argument("--share-delay-s", type=float, default=0.05, help="push -> other ingress replicas")
    ap.add_argument("--event-delay-s", type=float, default=0.005, help="KV event -> ingress (precise paths: <router>-kv)")
    ap.add_argument("--events-only", action="store_true",
                    help="precise paths trust the KV events alone (no modelled LRU of each cache's size)")
    ap.add_argument("--verbose", action="store_true", help="per-request placements of the first paths")
    ap.add_argument("--json")
    args, rest = ap.parse_known_args(argv)
    # The traces and engine sizes exactly as bench/routing.py makes them.
    rargs = routing.parse_args(rest)
    for k, v in vars(args).items():
        setattr(rargs, k, v)
    return rargs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = routing.sim_settings(args, {"--num-gpu-blocks", "--max-model-len"}, False)
    cfg = EngineConfig(max_num_seqs=args.slots, ttft=args.sim_ttft, itl=args.itl,
                       prefill_per_token=args.prefill_per_token, num_gpu_blocks=settings.blocks, block_size=16,
                       **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}))
    rows = []
    print(f"engines: {settings.description}; ingress replicas: {args.ingress}", file=sys.stderr)
    print(f"{'workload':14s}{'seed':>5s}  {'path':18s}{'p50':>8s}{'p90':>8s}{'p99':>8s}{'hit':>7s}{'pred':>6s}"
          f"{'moves':>7s}{'sticky':>7s}{'slow<5s':>8s}{'slow>5s':>8s}")
    for wl in args.workloads.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            args.seed = seed
            trace = BUILDERS[wl](args)
            for path in args.paths.split(","):
                res = simulate(path, trace, cfg, args)
                row = {"workload": wl, "seed": seed, **res.row()}
                rows.append(row)
                print(f"{wl:14s}{seed:5d}  {path:18s}{row['p50']:8.1f}{row['p90']:8.1f}{row['p99']:8.1f}{row['hit']:7.3f}"
                      f"{row['pred']:6.2f}{row['moves']:7d}{row['sticky']:7.2f}{row['slow_first_5s']:8d}{row['slow_after_5s']:8d}")
                if args.verbose:
                    for (at, g, r), t, (pc, fc) in zip(res.placements, res.ttft, res.cached):
                        print(f"    {at:7.2f} g{g} -> r{r}  {t * 1000:7.1f} ms  cached predicted {pc:5d} found {fc:5d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
