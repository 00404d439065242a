"""Unit tests for the routing policies: pure functions of the request facts and candidates."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from routers import (
    ROUTER_NAMES,
    Candidate,
    Router,
    RoutingFacts,
    build_router,
)
from routers.rotation import Rotation

FACTS = RoutingFacts(model="m")


def make(n: int, loads: Sequence[int] | None = None) -> list[Candidate]:
    """n candidates sorted by replica_id; ``loads`` go into ``running``."""
    loads = loads if loads is not None else [0] * n
    return [
        Candidate(replica_id=f"r{i}", url=f"http://127.0.0.1:{8100 + i}", running=loads[i], load_age_s=0.0)
        for i in range(n)
    ]


def ids(cands: Sequence[Candidate]) -> list[str]:
    return [c.replica_id for c in cands]


def assert_permutation(out: Sequence[Candidate], cands: Sequence[Candidate]) -> None:
    assert len(out) == len(cands)
    assert Counter(map(id, out)) == Counter(map(id, cands))


def firsts(router: Router, cands: Sequence[Candidate], picks: int, facts: RoutingFacts = FACTS) -> Counter[str]:
    return Counter(router.choose(facts, cands)[0].replica_id for _ in range(picks))


# ---------------------------------------------------------------- round_robin


def test_round_robin_spreads_exactly_evenly() -> None:
    router = build_router("round_robin")
    cands = make(3)
    assert firsts(router, cands, 300) == {"r0": 100, "r1": 100, "r2": 100}


def test_round_robin_fallbacks_continue_the_rotation() -> None:
    router = build_router("round_robin")
    cands = make(4)
    for turn in range(8):
        out = router.choose(FACTS, cands)
        assert_permutation(out, cands)
        start = turn % 4
        assert out == cands[start:] + cands[:start]


def test_round_robin_models_rotate_independently() -> None:
    router = build_router("round_robin")
    cands = make(3)
    a, b = RoutingFacts(model="a"), RoutingFacts(model="b")
    seq_a, seq_b = [], []
    for _ in range(3):
        seq_a.append(router.choose(a, cands)[0].replica_id)
        # Extra traffic to "b" must not move "a" along.
        seq_b.append(router.choose(b, cands)[0].replica_id)
        router.choose(b, cands)
    assert seq_a == ["r0", "r1", "r2"]
    assert seq_b == ["r0", "r2", "r1"]


def test_rotation_state_is_bounded() -> None:
    rot = Rotation(max_keys=4)
    for i in range(100):
        rot.next(f"model-{i}")
    assert len(rot) == 4
    # The most recent keys survive and keep counting.
    assert rot.next("model-99") == 1


# --------------------------------------------------------------------- random


def test_random_is_roughly_uniform_and_a_permutation() -> None:
    router = build_router("random", rng=random.Random(1234))
    cands = make(4)
    picks: Counter[str] = Counter()
    fallback_orders = set()
    for _ in range(6000):
        out = router.choose(FACTS, cands)
        assert_permutation(out, cands)
        picks[out[0].replica_id] += 1
        fallback_orders.add(tuple(ids(out[1:])))
    assert set(picks) == set(ids(cands))
    for n in picks.values():
        assert 1500 * 0.85 <= n <= 1500 * 1.15
    # Fallbacks are shuffled too, not a fixed order after the pick.
    assert len(fallback_orders) == 24


# -------------------------------------------------------------- least_request


def test_least_request_picks_least_loaded_and_orders_by_load() -> None:
    router = build_router("least_request")
    cands = make(4, loads=[5, 2, 9, 0])
    for _ in range(4):
        assert ids(router.choose(FACTS, cands)) == ["r3", "r1", "r0", "r2"]


def test_least_request_counts_running_and_waiting() -> None:
    router = build_router("least_request")
    cands = [
        Candidate("a", "http://a", running=0, waiting=5, load_age_s=0.0),
        Candidate("b", "http://b", running=3, waiting=0, load_age_s=0.0),
        Candidate("c", "http://c", running=2, waiting=2, load_age_s=0.0),
    ]
    for _ in range(3):
        assert ids(router.choose(FACTS, cands)) == ["b", "c", "a"]


def with_inflight(cands: Sequence[Candidate], inflight: dict[str, int]) -> list[Candidate]:
    """The candidates as the data plane hands them over with this many requests open here."""
    return [dataclasses.replace(c, inflight=inflight.get(c.replica_id, 0)) for c in cands]


def test_least_request_counts_local_inflight() -> None:
    router = build_router("least_request")
    cands = make(3, loads=[0, 1, 1])
    assert router.choose(FACTS, cands)[0].replica_id == "r0"
    # r0: 2 local, r1: 1 local + 1 scraped, r2: 1 scraped.
    busy = with_inflight(cands, {"r0": 2, "r1": 1})
    for _ in range(3):
        out = ids(router.choose(FACTS, busy))
        assert out[0] == "r2"
        assert sorted(out[1:]) == ["r0", "r1"]  # tied at 2, order rotates
    assert router.choose(FACTS, cands)[0].replica_id == "r0"


def test_least_request_spreads_ties_evenly() -> None:
    router = build_router("least_request")
    assert firsts(router, make(3), 300) == {"r0": 100, "r1": 100, "r2": 100}
    # Ties among a subset spread evenly too, and the busy replicas are never picked.
    router = build_router("least_request")
    assert firsts(router, make(4, loads=[0, 7, 0, 7]), 200) == {"r0": 100, "r2": 100}


# --------------------------------------------------------------- power_of_two


def test_power_of_two_never_picks_the_most_loaded() -> None:
    router = build_router("power_of_two", rng=random.Random(7))
    for loads in ([0, 10, 100], [3, 50, 1, 2, 9]):
        cands = make(len(loads), loads)
        worst = cands[loads.index(max(loads))]
        for _ in range(2000):
            out = router.choose(FACTS, cands)
            assert out[0] is not worst
            assert_permutation(out, cands)
            # The pick beats its pair; the rest follow by load.
            load = [c.running for c in out]
            assert load[0] <= load[1]
            assert load[2:] == sorted(load[2:])


def test_power_of_two_distribution() -> None:
    # Loads 0 < 10 < 100: the lightest wins every pair it is in (2/3 of pairs),
    # the middle one wins only the pair with the heaviest (1/3), the heaviest never.
    router = build_router("power_of_two", rng=random.Random(99))
    got = firsts(router, make(3, loads=[0, 10, 100]), 6000)
    assert 4000 * 0.9 <= got["r0"] <= 4000 * 1.1
    assert 2000 * 0.85 <= got["r1"] <= 2000 * 1.15
    assert got["r2"] == 0
    # Equal loads: the first sample wins, so picks are uniform.
    router = build_router("power_of_two", rng=random.Random(5))
    got = firsts(router, make(4), 6000)
    assert set(got) == {"r0", "r1", "r2", "r3"}
    for n in got.values():
        assert 1500 * 0.85 <= n <= 1500 * 1.15


def test_power_of_two_counts_local_inflight() -> None:
    router = build_router("power_of_two", rng=random.Random(3))
    cands = make(3)
    assert "r1" not in firsts(router, with_inflight(cands, {"r1": 50}), 500)
    assert "r1" in firsts(router, cands, 500)


def test_power_of_two_single_candidate() -> None:
    router = build_router("power_of_two", rng=random.Random(0))
    only = make(1)
    assert router.choose(FACTS, only) == only


# ------------------------------------------------------- all routers, property


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_every_router_returns_a_permutation(name: str) -> None:
    router = build_router(name, rng=random.Random(11))
    assert router.name == name
    assert isinstance(router, Router)
    gen = random.Random(name)
    for n in range(0, 9):
        for _ in range(50):
            cands = [
                Candidate(
                    replica_id=f"r{i}",
                    url=f"http://r{i}",
                    running=gen.randrange(4),
                    waiting=gen.randrange(3),
                    kv_cache_usage=gen.random(),
                    inflight=gen.randrange(3),
                )
                for i in range(n)
            ]
            facts = RoutingFacts(model=gen.choice("abc"))
            # Tuples are Sequences too; the gateway may pass either.
            for given in (cands, tuple(cands)):
                out = router.choose(facts, given)
                assert isinstance(out, list)
                assert_permutation(out, cands)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_every_router_returns_empty_for_no_candidates(name: str) -> None:
    router = build_router(name, rng=random.Random(0))
    assert router.choose(FACTS, []) == []


def test_build_router_rejects_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        build_router("x")
    assert str(info.value) == (
        "unknown router 'x'; choose one of: cache_aware, least_request, power_of_two, session_affinity, round_robin, random"
    )


def test_routers_package_is_pure_policy() -> None:
    """routers/ imports nothing from the gateway and does no I/O: policy is fed as data."""
    import ast
    import pathlib

    import routers

    allowed = {"__future__", "collections", "dataclasses", "typing", "random", "itertools", "math",
               "hashlib", "heapq", "bisect", "struct", "array", "enum", "json", "zlib"}
    root = pathlib.Path(routers.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside routers/
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
