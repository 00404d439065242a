"""The types every routing policy shares.

The gateway does the *filter* step (which replicas serve this model and are
healthy) before calling a router; a router only *scores* and *orders* what it is
given. Keeping the types frozen and slotted makes them cheap to build once per
metrics scrape and safe to share between concurrent requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Candidate:
    """One replica that may serve the request, with everything a policy may know of its load.

    Built by the data plane for each request. ``inflight`` is what this ingress replica
    has open on it right now. ``running``/``waiting``/``kv_cache_usage`` are the
    replica's last scraped figures, ``load_age_s`` seconds old (None: never scraped);
    ``scraped_inflight`` is this ingress's in-flight count when they arrived, so the
    requests it started or finished since are counted once (see ``load.load_of``).
    ``slots`` is the replica's number of running slots once seen saturated (None: not
    known); ``cache_tokens`` its KV cache size in tokens (None: not known).
    """

    replica_id: str
    url: str
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    inflight: int = 0
    load_age_s: float | None = None
    scraped_inflight: int = 0
    slots: int | None = None
    cache_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class RoutingFacts:
    """What a policy may know about the request, without reading its body again.

    ``blocks`` are the chained keys of the prompt's full blocks (``routers.prefix``),
    ``block_tokens`` tokens each; ``prompt_tokens`` is the prompt's length in tokens
    (estimated when the gateway does not tokenise). ``affinity_key`` is a stable key
    for hashing (the session, else the prompt's first block) that every ingress
    replica computes alike.
    """

    model: str
    session_key: str | None = None
    blocks: tuple[int, ...] = ()
    block_tokens: int = 16
    prompt_tokens: int = 0
    affinity_key: int = 0


class Ranking(list):
    """A router's ordered candidates, with what it expected of each (for feedback).

    ``expected[replica_id]`` is an ``Estimate``; routers that estimate nothing return
    a plain list.
    """

    __slots__ = ("expected",)

    def __init__(self, ordered: Sequence[Candidate], expected: Mapping[str, Estimate]) -> None:
        super().__init__(ordered)
        self.expected = expected


class Estimate(NamedTuple):
    """What a cost-based router predicted for one candidate (a tuple: cheap to make per request)."""

    cached_tokens: int
    uncached_tokens: int
    wait_s: float
    cost_s: float


@runtime_checkable
class Router(Protocol):
    """A routing policy: orders candidates, never drops or invents any."""

    name: str

    def choose(self, facts: RoutingFacts, candidates: Sequence[Candidate]) -> list[Candidate]:
        """All candidates, ordered by preference: [0] is the pick, the rest are fallbacks
        the gateway tries in order when an attempt fails before the first byte."""
        ...


@runtime_checkable
class LearningRouter(Router, Protocol):
    """A router that learns from what happened to the requests it placed."""

    def placed(self, facts: RoutingFacts, candidate: Candidate) -> None:
        """The request is being sent to ``candidate`` (each attempt): it will hold the prompt."""
        ...

    def observe(self, facts: RoutingFacts, estimate: Estimate, ttft_s: float | None, duration_s: float | None) -> None:
        """Measured times of a request placed with ``estimate`` (None: not measured)."""
        ...
