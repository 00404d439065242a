"""A Ray Serve gateway that sends OpenAI-style requests only to live vLLM replicas.

The tree follows the processes things run in:

- `ingress/`: the data plane, in every `Gateway` replica, on the request path;
- `control/`: the control plane, once per application, in the `ReplicaHealth` actor;
- beside them, what both use: `config`, `replicas` (the snapshot types), `metrics`,
  `background`; `simulators` runs the embedded demo's vLLM simulators; `app` wires it all.

Routing policy lives outside, in the top-level `routers` package, which is pure.
"""
