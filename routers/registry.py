"""Build a router by its configured name."""

from __future__ import annotations

import random

from .base import Router
from .least_request import LeastRequestRouter
from .power_of_two import PowerOfTwoRouter
from .random_choice import RandomRouter
from .round_robin import RoundRobinRouter

ROUTER_NAMES: tuple[str, ...] = ("round_robin", "random", "least_request", "power_of_two")


def build_router(name: str, rng: random.Random | None = None) -> Router:
    """The router called ``name``; ``rng`` seeds the randomised ones (tests pass a seeded one)."""
    if name == "round_robin":
        return RoundRobinRouter()
    if name == "random":
        return RandomRouter(rng)
    if name == "least_request":
        return LeastRequestRouter()
    if name == "power_of_two":
        return PowerOfTwoRouter(rng)
    raise ValueError(f"unknown router '{name}'; choose one of: {', '.join(ROUTER_NAMES)}")
