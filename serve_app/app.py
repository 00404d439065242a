"""The Serve application builder: `python -m serve_app run configs/local.yaml` (or `serve run`) or a RayService points here.

`import_path: serve_app.app:build_app`, with the gateway config as the application's `args`.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from .config import GatewayConfig, load_config
from .control import ReplicaHealth
from .ingress import Gateway
from .launch import serve_ingress_mode
from .simulators import LocalSimulators

logger = logging.getLogger(__name__)

SLOW_PROXY_WARNING = (
    "Ray Serve runs its Python HTTP proxy here (RAY_SERVE_ENABLE_HA_PROXY was not 1 where Ray "
    "started): several ms of CPU and latency per request. Start with "
    "`python -m serve_app run CONFIG` or `RAY_SERVE_ENABLE_HA_PROXY=1 serve run CONFIG` for HAProxy."
)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate the config (failing with a message that names the field) and wire the app.

    Warns when Ray was started in Serve's slow proxy mode: `serve run CONFIG` builds the app
    in a task on the cluster, whose environment is the one Ray started with.
    """
    if serve_ingress_mode() == "proxy":
        logger.warning(SLOW_PROXY_WARNING)
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
