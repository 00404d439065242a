"""Session affinity: a session's requests go to the same replica, unless it is overloaded.

Consistent hashing with bounded loads (Mirrokni et al.): replicas are ranked for the
session's key by rendezvous hashing, and the first one whose load is within
``(1 + epsilon)`` of the average takes the request. Sessions stay put while their
replica is not overloaded; when a replica leaves, only its sessions move. The key is
the ``x-session-id`` header or the body's ``user``; without one, the prompt's first
block stands in, so equal prompts still meet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import Candidate, RoutingFacts
from .load import DEFAULT_MAX_LOAD_AGE_S, load_of
from .rendezvous import StableIds, weight

DEFAULT_EPSILON = 0.25


class SessionAffinityRouter:
    """Rendezvous order for the request's key, skipping replicas loaded beyond the bound."""

    __slots__ = ("_ids", "_epsilon", "_max_load_age_s")
    name = "session_affinity"

    def __init__(self, epsilon: float = DEFAULT_EPSILON, max_load_age_s: float = DEFAULT_MAX_LOAD_AGE_S) -> None:
        if epsilon <= 0:
            raise ValueError("epsilon must be > 0")
        self._ids = StableIds()
        self._epsilon = epsilon
        self._max_load_age_s = max_load_age_s

    def choose(self, facts: RoutingFacts, candidates: Sequence[Candidate]) -> list[Candidate]:
        n = len(candidates)
        if n <= 1:
            return list(candidates)
        key = facts.affinity_key
        ranked = sorted(candidates, key=lambda c: weight(self._ids.of(c.replica_id), key), reverse=True)
        loads = {c.replica_id: load_of(c, self._max_load_age_s) for c in candidates}
        # Capacity per replica with this request placed: ceil((1 + eps) * average).
        bound = math.ceil((1 + self._epsilon) * (sum(loads.values()) + 1) / n)
        for i, c in enumerate(ranked):
            if loads[c.replica_id] + 1 <= bound:
                if i:
                    ranked.insert(0, ranked.pop(i))
                break
        return ranked

    def forget_replicas(self, keep: Sequence[str]) -> None:
        self._ids.retain(keep)
