"""The types every routing policy shares.

The gateway does the *filter* step (which replicas serve this model and are
healthy) before calling a router; a router only *scores* and *orders* what it is
given. Keeping the types frozen and slotted makes them cheap to build once per
metrics scrape and safe to share between concurrent requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Candidate:
    """One replica that may serve the request, with everything a policy may know of its load.

    Built by the data plane for each request: ``inflight`` is what this ingress replica
    has open on it right now; ``running``/``waiting``/``kv_cache_usage`` are the
    replica's last scraped figures, ``load_age_s`` seconds old (None: never scraped).
    """

    replica_id: str
    url: str
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    inflight: int = 0
    load_age_s: float | None = None


@dataclass(frozen=True, slots=True)
class RoutingFacts:
    """What a policy may know about the request, without reading its body again."""

    model: str
    prefix: str = ""
    session_key: str | None = None


@runtime_checkable
class Router(Protocol):
    """A routing policy: orders candidates, never drops or invents any."""

    name: str

    def choose(self, facts: RoutingFacts, candidates: Sequence[Candidate]) -> list[Candidate]:
        """All candidates, ordered by preference: [0] is the pick, the rest are fallbacks
        the gateway tries in order when an attempt fails before the first byte."""
        ...
