"""Least request: send to the replica with the fewest requests open."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Candidate, RoutingFacts
from .load import DEFAULT_MAX_LOAD_AGE_S, load_of
from .rotation import DEFAULT_MAX_KEYS, Rotation


class LeastRequestRouter:
    """Lowest load first (see ``load_of``); equal loads are broken by rotation.

    Without the rotation, every tie (e.g. an idle cluster between scrapes)
    would go to the first replica in the list.
    """

    __slots__ = ("_rotation", "_max_load_age_s")
    name = "least_request"

    def __init__(self, max_models: int = DEFAULT_MAX_KEYS, max_load_age_s: float = DEFAULT_MAX_LOAD_AGE_S) -> None:
        self._max_load_age_s = max_load_age_s
        self._rotation = Rotation(max_models)

    def choose(self, facts: RoutingFacts, candidates: Sequence[Candidate]) -> list[Candidate]:
        n = len(candidates)
        if n == 0:
            return []
        if n == 1:
            return [candidates[0]]
        loads = [load_of(c, self._max_load_age_s) for c in candidates]
        # Rotate over the replicas tied at the lowest load, not over all of them:
        # rotating over all would favour whichever tied replica follows the most
        # untied ones in the list.
        low = min(loads)
        skip = self._rotation.next(facts.model) % loads.count(low)
        start = 0
        for start, load in enumerate(loads):
            if load == low:
                if skip == 0:
                    break
                skip -= 1
        order = sorted(range(n), key=lambda i: (loads[i], (i - start) % n))
        return [candidates[i] for i in order]
