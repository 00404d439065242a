"""The data plane: what runs in every ingress (`Gateway`) replica, on the request path.

`gateway` holds the Serve deployment and its routes; `parsing` reads the routing
fields of a request; `local_view` is this replica's copy of the replica table;
`forwarding` sends, retries and relays; `inflight` counts what this replica has
open on each vLLM replica; `errors` shapes every error the client sees.
Nothing here calls the control plane on the request path.
"""

from .gateway import Gateway

__all__ = ["Gateway"]
