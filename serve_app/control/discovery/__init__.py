"""Discovery sources: where the health actor learns which replicas exist."""

from .base import DiscoverySink, DiscoverySource
from .factory import build_source

__all__ = ["DiscoverySink", "DiscoverySource", "build_source"]
