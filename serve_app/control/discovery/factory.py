"""Build the configured discovery source."""

from __future__ import annotations

from ...config import GatewayConfig
from .base import DiscoverySource
from .static import StaticSource


def build_source(config: GatewayConfig) -> DiscoverySource:
    discovery = config.discovery
    if discovery.kind == "kubernetes":
        from .kubernetes import KubernetesSource  # imported lazily: static users need no cluster libs

        return KubernetesSource(discovery)
    return StaticSource(config.static_urls(), discovery.models)
