"""The one load figure that load-aware policies compare."""

from __future__ import annotations

from .base import Candidate


def load_of(candidate: Candidate) -> int:
    """This ingress's in-flight requests plus the replica's scraped running + waiting.

    The local count covers the time since the last scrape; the scraped part
    covers traffic from other gateway replicas.
    """
    return candidate.inflight + candidate.running + candidate.waiting
