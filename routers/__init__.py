"""Routing policies for the gateway: pure functions of (request facts, replicas, load).

Shaped like the Gateway API Inference Extension's endpoint picker, cut down:
the gateway *filters* (replicas serving the model, healthy), a router *scores*
and *picks* by returning every candidate in preference order. No I/O here.
"""

from .base import Candidate, Estimate, LearningRouter, Ranking, Router, RoutingFacts
from .prefix_index import PrefixIndex
from .registry import ROUTER_NAMES, build_router

__all__ = [
    "Candidate",
    "Estimate",
    "Ranking",
    "LearningRouter",
    "PrefixIndex",
    "RoutingFacts",
    "Router",
    "build_router",
    "ROUTER_NAMES",
]
