"""Cache- and load-aware policies: pure tests over data (no I/O)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tracemalloc

import pytest

from routers import Candidate, PrefixIndex, RoutingFacts, build_router
from routers.cache_aware import CacheAwareRouter
from routers.latency import LatencyModel
from routers.load import load_of
from routers.prefix import text_blocks, token_blocks
from routers.prefix_index import BYTES_PER_ENTRY
from routers.session_affinity import SessionAffinityRouter


def facts_for(text: str, model: str = "m", session: int | None = None) -> RoutingFacts:
    blocks = tuple(text_blocks(text))
    return RoutingFacts(
        model=model, blocks=blocks, block_tokens=16, prompt_tokens=len(text) // 4,
        affinity_key=session if session is not None else (blocks[0] & 0xFFFFFFFF if blocks else 0),
    )


def cand(rid: str, running: int = 0, waiting: int = 0, inflight: int = 0, slots: int | None = 4,
         cache_tokens: int | None = None) -> Candidate:
    return Candidate(rid, f"http://{rid}", running=running, waiting=waiting, inflight=inflight,
                     load_age_s=0.0, slots=slots, cache_tokens=cache_tokens)


SYSTEM = "You are a helpful assistant who answers in full sentences. " * 140  # ~8 KB, ~2000 tokens


def route(router: CacheAwareRouter, facts: RoutingFacts, cands: list[Candidate]) -> str:
    """Choose and place, as forwarding does."""
    pick = router.choose(facts, cands)[0]
    router.placed(facts, pick)
    return pick.replica_id


# ------------------------------------------------------------------ prompt hashing


def test_text_blocks_chain_and_are_stable() -> None:
    a = text_blocks("x" * 64 + "y" * 64 + "z" * 10)
    b = text_blocks("x" * 64 + "y" * 64 + "w" * 64)
    assert len(a) == 2 and len(b) == 3  # only full blocks
    assert a == b[:2]
    # A different first block changes every later key (a chain, not per-block keys).
    c = text_blocks("q" * 64 + "y" * 64)
    assert c[1] != a[1]
    # Stable across processes (ingress replicas must agree): not a salted hash().
    code = "from routers.prefix import text_blocks; print(text_blocks('héllo wörld ' * 20))"
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{text_blocks('héllo wörld ' * 20)}\n"}


def test_token_blocks_salt_separates_adapters() -> None:
    ids = list(range(64))
    assert token_blocks(ids, 16) != token_blocks(ids, 16, salt=7)
    assert len(token_blocks(ids + [1, 2], 16)) == 4


# ------------------------------------------------------------------ prefix index


def test_index_match_counts_leading_blocks_per_replica() -> None:
    index = PrefixIndex(1000)
    index.add("a", [1, 2, 3, 4])
    index.add("b", [1, 2, 9])
    assert index.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert index.match([7, 1, 2]) == {}
    assert index.match([1, 2, 9]) == {"a": 2, "b": 3}


def _leading_blocks(index: PrefixIndex, replica: str, keys: list[int]) -> int:
    """The definition, walked block by block: what match's binary search must agree with."""
    depth = 0
    for key in keys:
        if replica not in index._holders.get(key, ()):
            break
        depth += 1
    return depth


def test_index_match_agrees_with_a_block_by_block_walk_under_eviction() -> None:
    gen = random.Random(7)
    index = PrefixIndex(3000)
    for replica in ("a", "b", "c"):
        index.set_capacity(replica, gen.randrange(40, 400))
    trunks = [[gen.getrandbits(64) for _ in range(gen.randrange(1, 150))] for _ in range(12)]
    prompts = []
    for _ in range(600):
        trunk = gen.choice(trunks)
        keys = trunk[: gen.randrange(1, len(trunk) + 1)] + [gen.getrandbits(64) for _ in range(gen.randrange(0, 4))]
        prompts.append(keys)
        index.add(gen.choice("abc"), keys)
        probe = gen.choice(prompts)
        want = {r: d for r in ("a", "b", "c") if (d := _leading_blocks(index, r, probe))}
        assert index.match(probe) == want


def test_index_removed_replica_entries_go() -> None:
    index = PrefixIndex(1000)
    index.add("a", [1, 2, 3])
    index.add("b", [1, 2, 3])
    index.retain(["b"])
    assert index.match([1, 2, 3]) == {"b": 3}
    assert len(index) == 3 and index.replicas() == ["b"]
    index.forget("b")
    assert index.match([1]) == {} and len(index) == 0


def test_index_eviction_keeps_memory_under_the_bound() -> None:
    bound = 5000
    index = PrefixIndex(bound)
    gen = random.Random(1)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for i in range(400):
        replica = f"r{i % 8}"
        chain = [gen.getrandbits(64) for _ in range(gen.randrange(1, 200))]
        index.add(replica, chain)
        assert len(index) <= bound
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index) > bound * 0.9  # it is full, not empty
    # The stated per-entry cost is an honest upper bound of what was allocated.
    assert used - base <= bound * BYTES_PER_ENTRY * 1.2, (used - base) / len(index)


def test_index_evicts_a_chain_from_its_tail() -> None:
    index = PrefixIndex(1000)
    index.set_capacity("a", 4)
    index.add("a", [1, 2, 3])
    index.add("a", [7, 8, 9])  # over capacity: the oldest chain loses its tail first
    assert index.match([1, 2, 3]) == {"a": 1}
    assert index.match([7, 8, 9]) == {"a": 3}


def test_an_event_for_a_held_chain_does_not_make_its_tail_younger_than_its_prefix() -> None:
    # KV events report blocks a placement already recorded; re-touching them would make
    # the chain's tail more recent than its head, and the LRU would evict the head first.
    index = PrefixIndex(1000)
    index.set_capacity("a", 5)
    index.add("a", [1, 2, 3])
    index.add("a", [7, 8])
    index.add("a", [2, 3], touch=False)
    index.add("a", [9])  # one over: the least recently used block goes
    assert index.match([1, 2, 3]) == {"a": 2}  # the tail went, the prefix stays


def test_index_remove_and_clear_as_events_say() -> None:
    index = PrefixIndex(1000)
    index.add("a", [1, 2, 3])
    index.remove("a", [3])
    assert index.match([1, 2, 3]) == {"a": 2}
    index.clear("a")
    assert index.match([1]) == {} and len(index) == 0


# ------------------------------------------------------------------ cache-aware policy


def test_prefix_match_picks_the_holder() -> None:
    router = CacheAwareRouter()
    cands = [cand("r0"), cand("r1"), cand("r2"), cand("r3")]
    first = facts_for(SYSTEM + "question one")
    holder = route(router, first, cands)
    for question in ("two", "three", "four", "five"):
        assert route(router, facts_for(SYSTEM + "question " + question), cands) == holder
    ranking = router.choose(facts_for(SYSTEM + "question six"), cands)
    expected = ranking.expected[holder]
    assert expected.cached_tokens > 1900 and expected.uncached_tokens < 100


def test_a_busy_holder_loses_to_an_idle_cold_replica_when_the_cost_says_so() -> None:
    router = CacheAwareRouter()
    latency = router.latency("m")
    latency.prefill_s_per_token = 2e-4  # 2000 uncached tokens: 0.4 s
    latency.service_s = 1.0
    cands = [cand("r0"), cand("r1")]
    facts = facts_for(SYSTEM)
    holder = route(router, facts, cands)
    other = "r1" if holder == "r0" else "r0"
    # Holder with a queue worth less than a cold prefill: it keeps the prefix.
    mild = [cand(holder, running=4, waiting=0), cand(other)]
    assert router.choose(facts, mild)[0].replica_id == holder
    # Holder so busy that waiting there costs more than prefilling elsewhere: spread.
    busy = [cand(holder, running=4, waiting=6), cand(other)]
    ranking = router.choose(facts, busy)
    assert ranking[0].replica_id == other
    assert ranking.expected[holder].cost_s > ranking.expected[other].cost_s


def test_spreading_counts_what_it_would_evict() -> None:
    router = CacheAwareRouter()
    latency = router.latency("m")
    latency.prefill_s_per_token = 2e-4  # 2000 uncached tokens: 0.4 s
    latency.service_s = 1.0
    facts = facts_for(SYSTEM)
    route(router, facts, [cand("holder", cache_tokens=6000), cand("other", cache_tokens=6000)])
    # Fill "other"'s modelled cache with two other prompts (its cache holds about three).
    for g in range(2):
        router.placed(facts_for(f"another system prompt {g}. " * 330), cand("other", cache_tokens=6000))
    # A queue of 2 ahead on the holder: 0.5 s of waiting. A cold prefill is 0.4 s, but on
    # a full cache it also throws out another prompt's 0.4 s: stay and wait.
    busy = cand("holder", running=4, waiting=1, cache_tokens=6000)
    assert router.choose(facts, [busy, cand("other", cache_tokens=6000)])[0].replica_id == "holder"
    # An idle replica with an empty cache costs just the prefill: go there.
    assert router.choose(facts, [busy, cand("empty", cache_tokens=6000)])[0].replica_id == "empty"


def test_latency_is_learned_from_time_in_a_slot_not_time_queued() -> None:
    router = CacheAwareRouter()
    facts = facts_for(SYSTEM)
    estimate = router.choose(facts, [cand("r0")]).expected["r0"]
    for _ in range(200):  # 3 s end to end, of which 2.5 s waiting for the first token
        router.observe(facts, estimate, ttft_s=2.5, duration_s=3.0)
    assert router.latency("m").service_s < 1.2


def test_hot_prefix_spreads_to_more_replicas_under_load_and_no_more() -> None:
    router = CacheAwareRouter()
    router.latency("m").prefill_s_per_token = 2e-4
    loads = {"r0": 0, "r1": 0, "r2": 0, "r3": 0}
    picks = []
    for i in range(24):  # a burst of one hot prefix, each request staying in flight
        cands = [cand(rid, inflight=n) for rid, n in loads.items()]
        rid = route(router, facts_for(SYSTEM + f"q{i}"), cands)
        loads[rid] += 1
        picks.append(rid)
    holders = set(picks)
    assert 2 <= len(holders) <= 4  # no herding onto one replica
    assert picks[:4] == [picks[0]] * 4  # but while the holder has free slots it keeps it


def test_no_reusable_prefix_goes_to_the_least_loaded() -> None:
    router = CacheAwareRouter()
    cands = [cand("r0", running=3), cand("r1", running=1), cand("r2", running=2)]
    for i in range(5):
        assert router.choose(facts_for(f"unique prompt {i} " * 40), cands)[0].replica_id == "r1"


def test_new_prefixes_pack_onto_replicas_with_room() -> None:
    # Four replicas whose caches hold two system prompts each; eight prompts arrive.
    router = CacheAwareRouter()
    cache_tokens = 2 * 2100
    cands = [cand(f"r{i}", cache_tokens=cache_tokens) for i in range(4)]
    prompts = [f"system prompt number {g}. " * 330 for g in range(8)]
    owner = {g: route(router, facts_for(p + "hello"), cands) for g, p in enumerate(prompts)}
    per_replica = {rid: sum(1 for o in owner.values() if o == rid) for rid in ("r0", "r1", "r2", "r3")}
    assert per_replica == {"r0": 2, "r1": 2, "r2": 2, "r3": 2}
    # And each group keeps going where it went.
    for g, p in enumerate(prompts):
        assert route(router, facts_for(p + "again"), cands) == owner[g]


def test_cold_placement_agrees_across_routers_with_the_same_view() -> None:
    # Two ingress replicas that never talk place the same new prompt alike.
    a, b = CacheAwareRouter(), CacheAwareRouter()
    cands = [cand(f"r{i}") for i in range(6)]
    for g in range(20):
        facts = facts_for(f"group {g} prompt " * 40)
        assert a.choose(facts, cands)[0].replica_id == b.choose(facts, cands)[0].replica_id


def test_latency_model_learns_the_prefill_rate_and_service_time() -> None:
    model = LatencyModel()
    gen = random.Random(3)
    for _ in range(300):
        uncached = gen.choice([16, 2000])
        model.observe_ttft(uncached, 0.03 + 2e-4 * uncached + gen.uniform(-0.002, 0.002))
        model.observe_duration(0.5 + gen.uniform(-0.05, 0.05))
    assert model.prefill_s_per_token == pytest.approx(2e-4, rel=0.05)
    assert model.base_s == pytest.approx(0.03, abs=0.005)
    assert model.service_s == pytest.approx(0.5, abs=0.05)
    assert model.wait_s(3, 4) == 0.0 and model.wait_s(7, 4) == pytest.approx(4 * 0.5 / 4, rel=0.1)


def test_load_counts_local_and_scraped_requests_once() -> None:
    # Scraped 3 running + 1 waiting while this ingress had 2 open there; it opened 1 more since.
    c = Candidate("r", "u", running=3, waiting=1, inflight=3, load_age_s=0.1, scraped_inflight=2)
    assert load_of(c) == 5  # not 3 + 1 + 3
    # A stale scrape is not trusted: only what this ingress knows.
    stale = Candidate("r", "u", running=30, waiting=10, inflight=3, load_age_s=9.0, scraped_inflight=2)
    assert load_of(stale, max_age_s=1.0) == 3
    # Never below the local count (requests other ingresses finished can't hide ours).
    low = Candidate("r", "u", running=0, waiting=0, inflight=4, load_age_s=0.0, scraped_inflight=0)
    assert load_of(low) == 4


def test_at_100_replicas_the_holder_still_wins() -> None:
    # (Decision time is measured by bench/routing.py, not asserted here.)
    router = CacheAwareRouter()
    cands = [cand(f"r{i:03d}", running=i % 3) for i in range(100)]
    owners = {g: route(router, facts_for(f"group {g} " * 300), cands) for g in range(50)}
    assert len(set(owners.values())) > 10  # spread over many replicas
    for g, owner in owners.items():
        ranking = router.choose(facts_for(f"group {g} " * 300 + "next"), cands)
        assert ranking[0].replica_id == owner
        assert sorted(c.replica_id for c in ranking) == [c.replica_id for c in cands]  # all of them, once
    # A prompt nobody holds goes to the least loaded of the window it scores (load 0 here).
    fresh = router.choose(facts_for("never seen " * 300), cands)
    assert fresh[0].running == 0


# ------------------------------------------------------------------ session affinity


def test_session_affinity_is_stable_and_moves_only_a_removed_replicas_keys() -> None:
    router = SessionAffinityRouter()
    cands = [cand(f"r{i}") for i in range(5)]
    sessions = range(500)
    before = {s: router.choose(RoutingFacts(model="m", affinity_key=s), cands)[0].replica_id for s in sessions}
    again = {s: router.choose(RoutingFacts(model="m", affinity_key=s), cands)[0].replica_id for s in sessions}
    assert before == again
    assert len(set(before.values())) == 5
    fewer = [c for c in cands if c.replica_id != "r2"]
    after = {s: router.choose(RoutingFacts(model="m", affinity_key=s), fewer)[0].replica_id for s in sessions}
    moved = {s for s in sessions if after[s] != before[s]}
    assert moved == {s for s in sessions if before[s] == "r2"}


def test_session_affinity_bounds_the_load() -> None:
    router = SessionAffinityRouter(epsilon=0.25)
    key = 12345
    owner = router.choose(RoutingFacts(model="m", affinity_key=key), [cand(f"r{i}") for i in range(4)])[0].replica_id
    # The owner far above the average: the session goes elsewhere for now...
    busy = [cand(f"r{i}", inflight=20 if f"r{i}" == owner else 1) for i in range(4)]
    assert router.choose(RoutingFacts(model="m", affinity_key=key), busy)[0].replica_id != owner
    # ... and back once it is not.
    calm = [cand(f"r{i}", inflight=1) for i in range(4)]
    assert router.choose(RoutingFacts(model="m", affinity_key=key), calm)[0].replica_id == owner


def test_default_router_in_the_shipped_configs_is_cache_aware() -> None:
    import pathlib

    import yaml

    for name in ("local.yaml", "app.yaml"):
        config = yaml.safe_load((pathlib.Path(__file__).parent.parent / "configs" / name).read_text())
        assert config["applications"][0]["args"]["router"] == "cache_aware"
    assert build_router("cache_aware").name == "cache_aware"
