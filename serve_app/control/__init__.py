"""The control plane: what runs once per application, in the `ReplicaHealth` actor.

`health` is the Serve deployment; `discovery/` learns which replicas exist (static
list or Kubernetes pods); `prober` checks `/health` and `/v1/models` and scrapes
`/metrics`, which `load_metrics` parses; `table` merges all of it into one state per
replica and publishes versioned snapshots that ingress replicas long-poll.
"""

from .health import ReplicaHealth

__all__ = ["ReplicaHealth"]
