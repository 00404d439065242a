"""Build a router by its configured name."""

from __future__ import annotations

import random

from .base import Router
from .cache_aware import CacheAwareRouter
from .least_request import LeastRequestRouter
from .load import DEFAULT_MAX_LOAD_AGE_S
from .power_of_two import PowerOfTwoRouter
from .prefix_index import DEFAULT_MAX_BLOCKS, PrefixIndex
from .random_choice import RandomRouter
from .round_robin import RoundRobinRouter
from .session_affinity import SessionAffinityRouter

ROUTER_NAMES: tuple[str, ...] = (
    "cache_aware",
    "least_request",
    "power_of_two",
    "session_affinity",
    "round_robin",
    "random",
)


def build_router(
    name: str,
    rng: random.Random | None = None,
    *,
    max_load_age_s: float = DEFAULT_MAX_LOAD_AGE_S,
    index: PrefixIndex | None = None,
    model_capacity: bool = True,
) -> Router:
    """The router called ``name``.

    ``rng`` seeds the randomised ones (tests pass a seeded one); ``index`` is the
    prefix index cache_aware reads (shared with a KV-event consumer in precise mode,
    where the replicas also report evictions; ``model_capacity=False`` trusts them alone).
    """
    if name == "cache_aware":
        return CacheAwareRouter(
            index if index is not None else PrefixIndex(DEFAULT_MAX_BLOCKS),
            max_load_age_s=max_load_age_s,
            model_capacity=model_capacity,
        )
    if name == "least_request":
        return LeastRequestRouter(max_load_age_s=max_load_age_s)
    if name == "power_of_two":
        return PowerOfTwoRouter(rng, max_load_age_s=max_load_age_s)
    if name == "session_affinity":
        return SessionAffinityRouter(max_load_age_s=max_load_age_s)
    if name == "round_robin":
        return RoundRobinRouter()
    if name == "random":
        return RandomRouter(rng)
    raise ValueError(f"unknown router '{name}'; choose one of: {', '.join(ROUTER_NAMES)}")
