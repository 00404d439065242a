"""The one load figure that load-aware policies compare."""

from __future__ import annotations

from .base import Candidate
from .inflight import InflightTracker


def load_of(candidate: Candidate, inflight: InflightTracker) -> int:
    """Local in-flight requests plus the replica's scraped running + waiting.

    The local count covers the time since the last scrape; the scraped part
    covers traffic from other gateway replicas.
    """
    return inflight.count(candidate.replica_id) + candidate.running + candidate.waiting
