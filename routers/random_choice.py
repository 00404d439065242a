"""Random: uniform, stateless spreading."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .base import Candidate, RoutingFacts


class RandomRouter:
    """A uniformly random permutation: random pick, random fallbacks."""

    __slots__ = ("_rng",)
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def choose(self, facts: RoutingFacts, candidates: Sequence[Candidate]) -> list[Candidate]:
        return self._rng.sample(candidates, len(candidates))
