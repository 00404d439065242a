"""Power of two choices: near least-request balance without herding.

Every gateway replica sees the same stale scrape, so pure least-request sends
them all to the same "least loaded" replica at once; comparing two random
samples spreads that burst while still avoiding the busiest replicas.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .base import Candidate, RoutingFacts
from .load import DEFAULT_MAX_LOAD_AGE_S, load_of


class PowerOfTwoRouter:
    """Less loaded of two random distinct samples, then the other, then the rest by load."""

    __slots__ = ("_rng", "_max_load_age_s")
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None, max_load_age_s: float = DEFAULT_MAX_LOAD_AGE_S) -> None:
        self._max_load_age_s = max_load_age_s
        self._rng = rng if rng is not None else random.Random()

    def choose(self, facts: RoutingFacts, candidates: Sequence[Candidate]) -> list[Candidate]:
        n = len(candidates)
        if n == 0:
            return []
        if n == 1:
            return [candidates[0]]
        loads = [load_of(c, self._max_load_age_s) for c in candidates]
        # Two distinct indices without building a sample list.
        a = self._rng.randrange(n)
        b = self._rng.randrange(n - 1)
        if b >= a:
            b += 1
        if loads[b] < loads[a]:
            a, b = b, a
        out = [candidates[a], candidates[b]]
        if n > 2:
            rest = sorted((i for i in range(n) if i != a and i != b), key=loads.__getitem__)
            out.extend(candidates[i] for i in rest)
        return out
