"""The one load figure that load-aware policies compare."""

from __future__ import annotations

from .base import Candidate

# Scraped figures older than this are not trusted (a few scrape intervals).
DEFAULT_MAX_LOAD_AGE_S = 2.0


def load_of(candidate: Candidate, max_age_s: float = DEFAULT_MAX_LOAD_AGE_S) -> int:
    """Requests open on the replica: its scraped running + waiting, corrected by what this
    ingress started or finished on it since they arrived, and never below this ingress's
    own in-flight count.

    Counting each request once matters: adding the local count to a scrape that
    already includes those requests would make a replica look twice as busy as it is.
    A scrape older than ``max_age_s`` (or none) leaves only the local count.
    """
    local = candidate.inflight
    age = candidate.load_age_s
    if age is None or age > max_age_s:
        return local
    scraped = candidate.running + candidate.waiting + local - candidate.scraped_inflight
    return scraped if scraped > local else local
