"""Round robin: each model's requests take turns over its replicas."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Candidate, RoutingFacts
from .rotation import DEFAULT_MAX_KEYS, Rotation


class RoundRobinRouter:
    """Rotates the starting point per model; fallbacks continue the rotation.

    Turns are counted per model, so traffic to one model does not skew another
    model's spread. Stable only if the candidate order is stable (the gateway
    passes them sorted by replica_id).
    """

    __slots__ = ("_rotation",)
    name = "round_robin"

    def __init__(self, max_models: int = DEFAULT_MAX_KEYS) -> None:
        self._rotation = Rotation(max_models)

    def choose(self, facts: RoutingFacts, candidates: Sequence[Candidate]) -> list[Candidate]:
        n = len(candidates)
        if n == 0:
            return []
        start = self._rotation.next(facts.model) % n
        out = list(candidates[start:])
        out.extend(candidates[:start])
        return out
