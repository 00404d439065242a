"""Cache- and load-aware routing: the replica with the lowest expected time to first token.

For each candidate (filter -> score -> pick, as in llm-d's endpoint picker):

    cost = queue wait (its load vs its running slots)
         + base + prefill of the prompt tokens it does not hold (prefix index)
         + what writing those tokens evicts (the same prefill again, times how full its cache is)

in seconds, with rates learned from what the gateway measures (``latency``). The eviction
term is the price others pay later: a replica whose cache is full makes room for a new
prompt by dropping someone else's, who will prefill again. Without it a busy holder
spreads its prefix onto replicas whose caches are full and the cluster thrashes. One
number, no threshold switch: a hot prefix stays on its holder while waiting there is
cheaper than a cold prefill elsewhere, and spreads to another replica (which then holds
it too) once it is not, so one system prompt cannot herd all traffic onto one replica.
A prompt that no replica holds costs the same prefill everywhere, so the least loaded
replica wins.

Ties are broken by load, then by how full the replica's modelled cache is (new
prefixes pack onto replicas with room before evicting others'), then by a rendezvous
hash of the request's affinity key, so ingress replicas that know the same place the
same prompt alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from .base import Candidate, Estimate, Ranking, RoutingFacts
from .latency import LatencyModel
from .load import DEFAULT_MAX_LOAD_AGE_S
from .prefix_index import DEFAULT_MAX_BLOCKS, PrefixIndex
from .rendezvous import StableIds, weight

DEFAULT_SLOTS = 8  # running slots assumed until a replica is seen saturated
MAX_ESTIMATES = 10  # estimates kept for the first candidates: the most attempts forwarding makes
TIE_S = 1e-9
SCORE_ALL_UP_TO = 8  # above this many candidates, score a window of them (see choose)
EVICTION_WEIGHT = 1.0  # evicted tokens are assumed as likely to be wanted again as the new ones
MAX_MODELS = 1024  # latency models kept; model names come from requests


class CacheAwareRouter:
    """Lowest expected TTFT first; learns its rates from ``observe``; records placements in its index."""

    name = "cache_aware"

    def __init__(
        self,
        index: PrefixIndex | None = None,
        *,
        max_load_age_s: float = DEFAULT_MAX_LOAD_AGE_S,
        model_capacity: bool = True,
    ) -> None:
        self.index = index if index is not None else PrefixIndex(DEFAULT_MAX_BLOCKS)
        self._max_load_age_s = max_load_age_s
        # Placements are recorded in both modes (a burst of a new prefix must find where
        # its first request went before the replica's event arrives), and both model
        # each replica's cache as an LRU of its real size. With KV events the replica
        # also says what it stored and evicted, but only once it happens: a request that
        # queues there for a second finds its prefix evicted by the prompts admitted
        # before it. The modelled LRU counts those prompts from the moment they are
        # placed (without it, precise mode over-predicted cached tokens by ~15% and
        # lost ~0.15 of hit rate under the zipf workload in bench/policy_sim.py).
        # ``model_capacity=False`` trusts the events alone.
        self._model_capacity = model_capacity
        self._models: dict[str, LatencyModel] = {}
        self._ids = StableIds()
        self._capacities: dict[str, int] = {}  # cache_tokens last given to the index, per replica

    def latency(self, model: str) -> LatencyModel:
        found = self._models.get(model)
        if found is None:
            if len(self._models) >= MAX_MODELS:
                del self._models[next(iter(self._models))]
            found = self._models[model] = LatencyModel()
        return found

    def learned(self) -> dict[str, dict[str, float]]:
        """Per model: the rates the cost uses, as learned so far (for /admin)."""
        return {
            model: {
                "prefill_s_per_token": m.prefill_s_per_token, "base_s": m.base_s, "service_s": m.service_s,
                "ttft_samples": m.samples,
            }
            for model, m in self._models.items()
        }

    def choose(self, facts: RoutingFacts, candidates: Sequence[Candidate]) -> Ranking:
        matched = self.index.match(facts.blocks) if facts.blocks else {}
        n = len(candidates)
        if n <= SCORE_ALL_UP_TO:
            return self._rank(facts, candidates, matched, ())
        # Many replicas: score the ones holding the prefix plus a window of SCORE_ALL_UP_TO
        # others (least loaded of a window is close to least loaded of all, as in
        # power-of-d choices). The window starts where the request's affinity key points,
        # so every ingress replica scores the same window; the rest follow unscored.
        start = facts.affinity_key % n
        stop = start + SCORE_ALL_UP_TO
        if stop <= n:
            window = list(candidates[start:stop])
            rest = [*candidates[stop:], *candidates[:start]]
        else:
            window = [*candidates[start:], *candidates[: stop - n]]
            rest = list(candidates[stop - n : start])
        if matched:
            in_window = {c.replica_id for c in window}
            if any(r not in in_window for r in matched):
                window.extend(c for c in rest if c.replica_id in matched)
                rest = [c for c in rest if c.replica_id not in matched]
        return self._rank(facts, window, matched, rest)

    def _rank(
        self, facts: RoutingFacts, candidates: Sequence[Candidate], matched: dict[str, int],
        unscored: Sequence[Candidate],
    ) -> Ranking:
        # The request path: one flat pass, no per-candidate objects.
        n = len(candidates)
        latency = self.latency(facts.model)
        per_block = facts.block_tokens
        prompt = facts.prompt_tokens
        service = latency.service_s
        base = latency.base_s
        rate = latency.prefill_s_per_token
        max_age = self._max_load_age_s
        blocks_of = self.index.blocks_of
        held_of = matched.get
        known = self._capacities
        model_capacity = self._model_capacity and per_block > 0
        costs: list[float] = []
        loads: list[int] = []
        waits: list[float] = []
        for c in candidates:
            rid = c.replica_id
            load = c.inflight  # load.load_of, inlined
            age = c.load_age_s
            if age is not None and age <= max_age:
                scraped = c.running + c.waiting + load - c.scraped_inflight
                if scraped > load:
                    load = scraped
            slots = c.slots or DEFAULT_SLOTS
            wait = (load + 1 - slots) * service / slots if load >= slots else 0.0
            held = held_of(rid)
            uncached = prompt - held * per_block if held else prompt
            if uncached < 0:
                uncached = 0
            cost = wait + base + rate * uncached
            capacity = c.cache_tokens
            if capacity:
                if model_capacity and known.get(rid) != capacity:
                    # Every replica's modelled cache gets its real size, also the ones this
                    # ingress only hears about from the others' shared placements.
                    known[rid] = capacity
                    self.index.set_capacity(rid, capacity // per_block)
                if uncached:
                    fill = blocks_of(rid) * per_block / capacity
                    cost += EVICTION_WEIGHT * rate * uncached * (fill if fill < 1.0 else 1.0)
            costs.append(cost)
            loads.append(load)
            waits.append(wait)
        order = sorted(range(n), key=costs.__getitem__)
        if n > 1:
            self._break_ties(order, costs, loads, candidates, facts, per_block)
        ranked = [candidates[i] for i in order]
        expected = _Estimates(ranked[:MAX_ESTIMATES], order, costs, waits, matched, prompt, per_block)
        if unscored:
            ranked.extend(unscored)
        return Ranking(ranked, expected)

    def _break_ties(
        self, order: list[int], costs: list[float], loads: list[int],
        candidates: Sequence[Candidate], facts: RoutingFacts, per_block: int,
    ) -> None:
        """Among the cheapest (equal cost): least loaded, then most cache room, then rendezvous."""
        best = costs[order[0]] + TIE_S
        k = 1
        while k < len(order) and costs[order[k]] <= best:
            k += 1
        if k == 1:
            return
        tied = order[:k]
        low = min(loads[i] for i in tied)
        first = [i for i in tied if loads[i] == low]
        if len(first) > 1:
            index = self.index
            key = facts.affinity_key
            ids = self._ids

            def rank(i: int) -> tuple[int, int]:
                c = candidates[i]
                fill = 0
                if c.cache_tokens:
                    fill = min(10, 10 * index.blocks_of(c.replica_id) * per_block // c.cache_tokens)
                return fill, -weight(ids.of(c.replica_id), key)

            first.sort(key=rank)
        rest = [i for i in tied if loads[i] != low]
        rest.sort(key=loads.__getitem__)
        order[:k] = first + rest

    def placed(self, facts: RoutingFacts, candidate: Candidate) -> None:
        if not facts.blocks:
            return
        if self._model_capacity and candidate.cache_tokens:
            self.index.set_capacity(candidate.replica_id, candidate.cache_tokens // max(1, facts.block_tokens))
        self.index.add(candidate.replica_id, facts.blocks)

    def observe(self, facts: RoutingFacts, estimate: Estimate, ttft_s: float | None, duration_s: float | None) -> None:
        latency = self.latency(facts.model)
        if ttft_s is not None and estimate.wait_s == 0.0:
            latency.observe_ttft(estimate.uncached_tokens, ttft_s)
        if duration_s is None:
            return
        # The queue-wait term needs how long a request holds a slot, not how long it took:
        # durations that include queueing would make a busy cluster look ever busier.
        if ttft_s is not None:  # (TTFT's base part may hide queueing; the prefill part is the slot's)
            in_slot = duration_s - ttft_s + latency.prefill_s_per_token * estimate.uncached_tokens
        else:
            in_slot = duration_s - estimate.wait_s
        latency.observe_duration(max(0.0, in_slot))

    def forget_replicas(self, keep: Sequence[str]) -> None:
        """Replicas not in ``keep`` are gone: drop their index entries."""
        self.index.retain(keep)
        self._ids.retain(keep)
        kept = set(keep)
        self._capacities = {r: v for r, v in self._capacities.items() if r in kept}



class _Estimates(Mapping[str, Estimate]):
    """replica_id -> Estimate for the first candidates of a ranking, made only when asked
    (forwarding asks for the one or two it tries; building ten tuples per request is waste)."""

    __slots__ = ("_at", "_order", "_costs", "_waits", "_matched", "_prompt", "_per_block")

    def __init__(
        self, first: Sequence[Candidate], order: list[int], costs: list[float], waits: list[float],
        matched: dict[str, int], prompt: int, per_block: int,
    ) -> None:
        self._at = {c.replica_id: i for i, c in enumerate(first)}
        self._order = order
        self._costs = costs
        self._waits = waits
        self._matched = matched
        self._prompt = prompt
        self._per_block = per_block

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._at

    def __len__(self) -> int:
        return len(self._at)

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __getitem__(self, replica_id: str) -> Estimate:
        i = self._order[self._at[replica_id]]
        cached = min(self._prompt, self._matched.get(replica_id, 0) * self._per_block)
        return Estimate(cached, self._prompt - cached, self._waits[i], self._costs[i])
