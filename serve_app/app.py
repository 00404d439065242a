"""The Serve application builder: `serve run configs/local.yaml` or a RayService points here.

`import_path: serve_app.app:build_app`, with the gateway config as the application's `args`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from .config import GatewayConfig, load_config
from .control import ReplicaHealth
from .ingress import Gateway
from .simulators import LocalSimulators


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate the config (failing with a message that names the field) and wire the app."""
    return build_from_config(load_config(args))


def build_from_config(config: GatewayConfig) -> Application:
    if config.discovery.kind == "kubernetes":
        from .control.discovery.kubernetes import resolve_credentials

        # No credentials at all is a configuration error: say so now, not in a retry loop later.
        # (The health actor resolves them again where it runs.)
        resolve_credentials(config.discovery)
    health = ReplicaHealth.bind(config)
    simulators = LocalSimulators.bind(config) if config.simulators is not None else None
    return Gateway.bind(config, health, simulators)
