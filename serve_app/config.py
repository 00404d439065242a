"""The gateway's whole configuration: one pydantic model, passed as the Serve app's args.

Every field has a default that works, so an empty config starts the local demo
(three embedded simulator replicas behind static discovery). Validation runs at
start-up and names the field that is wrong and why.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator


from routers import ROUTER_NAMES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StaticDiscovery(_Strict):
    """A fixed list of vLLM base URLs; each is probed, so dead ones get no traffic."""

    kind: Literal["static"] = "static"
    urls: list[str] = Field(default_factory=list, description="vLLM base URLs, e.g. http://10.0.0.5:8000")
    models: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Optional url -> served model names; otherwise learnt from the replica's /v1/models.",
    )

    @field_validator("urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must start with http:// or https://")
        return [url.rstrip("/") for url in urls]


class KubernetesDiscovery(_Strict):
    """Mirror vLLM pods from the Kubernetes API (list + watch)."""

    kind: Literal["kubernetes"] = "kubernetes"
    namespace: str | None = Field(
        default=None, description="Namespace to watch; null watches all namespaces."
    )
    label_selector: str = "app=vllm"
    model_label: str = Field(
        default="llm-gateway/model",
        description="Pod label (or annotation) naming the served model; without it the replica's /v1/models is asked.",
    )
    port: int = Field(default=8000, ge=1, le=65535)
    port_label: str = Field(
        default="llm-gateway/port", description="Pod label or annotation that overrides `port`."
    )
    scheme: Literal["http", "https"] = "http"
    kubeconfig: str | None = Field(
        default=None,
        description="Path to a kubeconfig; null: in-cluster credentials in a pod, else $KUBECONFIG, else ~/.kube/config.",
    )
    resync_period_s: float = Field(default=300.0, gt=0)
    watch_timeout_s: int = Field(default=240, ge=10)


Discovery = Annotated[Union[StaticDiscovery, KubernetesDiscovery], Field(discriminator="kind")]


class EmbeddedSimulators(_Strict):
    """Local simulated vLLM replicas started with the gateway (the no-cluster demo)."""

    replicas: int = Field(default=3, ge=1, le=64)
    model: str = "demo-model"
    host: str = "127.0.0.1"
    base_port: int = Field(default=8101, ge=1024, le=65000)
    extra_args: list[str] = Field(default_factory=list, description="Extra `python -m vllm_sim` flags.")


class Timeouts(_Strict):
    connect_s: float = Field(default=3.0, gt=0)
    first_byte_s: float = Field(
        default=300.0, gt=0,
        description="With no byte by then, the replica must pass a liveness check (/v1/models) or it counts as hung.",
    )
    idle_s: float = Field(default=120.0, gt=0, description="Longest gap between stream chunks (else the replica is stuck).")
    total_s: float = Field(default=1800.0, gt=0, description="The request's own limit; reaching it is not the replica's fault.")
    request_body_s: float = Field(
        default=60.0, gt=0,
        description="Longest time to receive a request body from the client (else 408); a slow sender "
        "must not hold a Gateway slot forever.",
    )


class Retries(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=10, description="Attempts before the first byte, each on another replica.")
    budget_s: float = Field(default=30.0, gt=0, description="Retries stop once this much time has passed.")


class Hold(_Strict):
    """Hold-and-wait: a request for a model with no READY replica but one starting waits for it."""

    timeout_s: float = Field(default=30.0, ge=0, description="Longest hold; 0 turns holding off.")
    max_waiting: int | None = Field(
        default=None, ge=0,
        description="Held requests per ingress replica; past it, 503 at once. Each holds one of the Gateway's "
        "Serve slots, so it must be below the Gateway's max_ongoing_requests; null: half of them.",
    )
    max_waiting_per_model: int | None = Field(
        default=None, ge=0,
        description="Held requests per model per ingress replica, so one model's cold start leaves holds "
        "for the others; null: half of max_waiting.",
    )
    retry_after_starting_s: int = Field(default=1, ge=1, description="Retry-After when replicas are starting.")

    @model_validator(mode="after")
    def _per_model_within_total(self) -> "Hold":
        if (
            self.max_waiting is not None
            and self.max_waiting_per_model is not None
            and self.max_waiting_per_model > self.max_waiting
        ):
            raise ValueError(
                f"max_waiting_per_model ({self.max_waiting_per_model}) must not exceed max_waiting ({self.max_waiting})"
            )
        return self

    def limits(self, slots: int) -> tuple[int, int]:
        """(in all, per model) held requests for an ingress replica with `slots` Serve slots.

        Raises ConfigError if `max_waiting` would let held requests take every slot: then a
        cold start of one model blocks every other model and /metrics on that replica.
        """
        if self.max_waiting is not None and self.max_waiting >= slots:
            raise ConfigError(
                f"hold.max_waiting ({self.max_waiting}) must be below the Gateway's max_ongoing_requests ({slots}): "
                "each held request occupies a Serve slot, and none would be left for other models or /metrics"
            )
        total = self.max_waiting if self.max_waiting is not None else slots // 2
        per_model = self.max_waiting_per_model if self.max_waiting_per_model is not None else (total + 1) // 2
        return total, min(per_model, total)


class Health(_Strict):
    probe_interval_s: float = Field(default=2.0, gt=0)
    probe_timeout_s: float = Field(default=2.0, gt=0)
    metrics_interval_s: float = Field(
        default=0.2, gt=0, description="How often replicas' /metrics are scraped for load (own pool, not the probes')."
    )
    eject_after_failures: int = Field(default=3, ge=1, description="Consecutive 5xx/timeouts before ejection.")
    ejection_base_s: float = Field(default=2.0, gt=0)
    ejection_max_s: float = Field(default=60.0, gt=0)


class MetricsSettings(_Strict):
    """Bounds on the label sets of the gateway's own /metrics."""

    replica_series_ttl_s: float = Field(
        default=600.0, ge=1,
        description="A vLLM replica's series (`replica` label) are dropped this long after it left the table, "
        "so pod churn cannot grow /metrics without bound.",
    )
    retire_ingress_after_s: float = Field(
        default=600.0, ge=30,
        description="An ingress replica silent this long is gone: its counters are folded into one retired "
        "total (fleet sums never go down) and its own entry is dropped.",
    )


class KVEvents(_Strict):
    """Precise prefix routing: consume the replicas' KV cache events (vLLM `--kv-events-config`).

    Each vLLM replica runs with e.g. `--kv-events-config '{"enable_kv_cache_events": true,
    "publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'`;
    every ingress replica subscribes to each READY replica at its pod IP on these ports.
    """

    enabled: bool = False
    port: int = Field(default=5557, ge=1, le=65535, description="The replicas' event PUB port.")
    port_offset: int | None = Field(
        default=None, ge=-65535, le=65535,
        description="If set, the event port is the replica's HTTP port plus this (several replicas on one host).",
    )
    replay: bool = Field(default=True, description="Replay missed batches from the replay socket at the event port + 1.")
    topic: str = ""
    block_size: int = Field(default=16, ge=1, description="The engines' KV block size (vLLM on CPU: 128).")


class Tokenizer(_Strict):
    """How the gateway turns a prompt into the replicas' token ids (needed for KV events).

    `none`: no tokenizer; the prefix index works on text blocks and learns from the
    gateway's own placements. `vllm_sim`: the simulator's documented word tokenizer.
    `huggingface`: the model's own tokenizer files in `path` (the directory vLLM loads:
    tokenizer.json and the chat template), e.g. a volume shared with the vLLM pods.
    """

    kind: Literal["none", "vllm_sim", "huggingface"] = "none"
    path: str | None = Field(
        default=None, description="The model's tokenizer directory (kind huggingface): tokenizer.json, tokenizer_config.json."
    )

    @model_validator(mode="after")
    def _path_for_huggingface(self) -> Tokenizer:
        if self.kind == "huggingface":
            if not self.path:
                raise ValueError("routing.tokenizer.kind 'huggingface' needs routing.tokenizer.path: the model's tokenizer directory")
            if not (Path(self.path) / "tokenizer.json").is_file():
                raise ValueError(
                    f"routing.tokenizer.path {self.path!r} has no tokenizer.json: give the directory vLLM loads the model's tokenizer from"
                )
        return self


class Routing(_Strict):
    """How cache- and load-aware routing sees prompts and load."""

    block_bytes: int = Field(
        default=64, ge=16, le=4096,
        description="Prompt text is hashed in blocks of this many bytes (~16 tokens) for the prefix index.",
    )
    max_index_blocks: int = Field(
        default=1 << 18, ge=1024,
        description="Hard bound on prefix-index entries per ingress replica (~300 bytes each: 75 MB at the default).",
    )
    max_load_age_s: float | None = Field(
        default=None, gt=0,
        description="Scraped load older than this is not trusted; null: 5 scrape intervals (at least 1 s).",
    )
    share_placements_s: float | None = Field(
        default=0.1, gt=0,
        description="Ingress replicas tell each other where they placed prompts this often (null: never).",
    )
    tokenizer: Tokenizer = Field(default_factory=Tokenizer)
    kv_events: KVEvents = Field(default_factory=KVEvents)

    @property
    def precise(self) -> bool:
        """KV events are consumed only when prompts can be tokenised like the replicas do."""
        return self.kv_events.enabled and self.tokenizer.kind != "none"


class GatewayConfig(_Strict):
    discovery: Discovery = Field(default_factory=StaticDiscovery)
    simulators: EmbeddedSimulators | None = None
    router: str = "cache_aware"
    router_header: str = "x-gateway-router"
    models: list[str] = Field(
        default_factory=list,
        description="Models answered with 503 rather than 404 even while no replica serves them.",
    )
    api_keys: list[SecretStr] = Field(default_factory=list, description="If set, clients must send one as a Bearer token.")
    api_keys_file: str | None = Field(
        default=None,
        description="More client keys from a file, one per line (a mounted Kubernetes Secret); blank lines and # comments are skipped.",
    )
    api_keys_env: str | None = Field(
        default=None, description="More client keys from this environment variable, separated by commas or whitespace."
    )
    admin_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys for /admin/*. When any key is set, /admin/* needs one of these (closed if there are none).",
    )
    admin_api_keys_file: str | None = Field(default=None, description="Admin keys from a file, as api_keys_file.")
    admin_api_keys_env: str | None = Field(default=None, description="Admin keys from an environment variable.")
    protect_metrics: bool = Field(default=False, description="/metrics needs a client or an admin key.")
    expose_replica_urls: bool = Field(
        default=False,
        description="Show replicas' internal URLs to clients in x-gateway-replica; false shows an opaque id instead.",
    )
    upstream_api_key: SecretStr | None = Field(
        default=None, description="Sent as a Bearer token to vLLM (started with --api-key) on requests and probes."
    )
    upstream_api_key_file: str | None = Field(default=None, description="The upstream key from a file.")
    upstream_api_key_env: str | None = Field(default=None, description="The upstream key from an environment variable.")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_response_bytes: int = Field(
        default=128 * 1024 * 1024, ge=1024,
        description="Largest non-streamed answer the gateway reads from a replica (streams pass through "
        "unbuffered); above it the client gets a 502 upstream_response_too_large.",
    )
    retry_after_s: int = Field(default=2, ge=1)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: Retries = Field(default_factory=Retries)
    hold: Hold = Field(default_factory=Hold)
    health: Health = Field(default_factory=Health)
    routing: Routing = Field(default_factory=Routing)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @field_validator("router")
    @classmethod
    def _known_router(cls, name: str) -> str:
        if name not in ROUTER_NAMES:
            raise ValueError(f"unknown router {name!r}; choose one of: {', '.join(ROUTER_NAMES)}")
        return name

    @model_validator(mode="after")
    def _something_to_route_to(self) -> "GatewayConfig":
        if self.simulators is not None and self.discovery.kind != "static":
            raise ValueError("simulators: only valid with discovery.kind=static (the local demo)")
        if self.discovery.kind == "static" and not self.discovery.urls and self.simulators is None:
            # The embedded default: an empty config is the local demo.
            object.__setattr__(self, "simulators", EmbeddedSimulators())
        return self

    def max_load_age_s(self) -> float:
        if self.routing.max_load_age_s is not None:
            return self.routing.max_load_age_s
        return max(1.0, 5 * self.health.metrics_interval_s)

    def resolve_keys(self, field: str) -> list[bytes]:
        """The keys of `field` (api_keys, admin_api_keys, upstream_api_key) from all its sources.

        Files and environment variables are read where the gateway runs (a Ray worker, a
        pod), not where the config was written. Raises ConfigError naming the field.
        """
        inline = getattr(self, field)
        if isinstance(inline, SecretStr):
            inline = [inline]
        keys = [key.get_secret_value().encode() for key in inline or ()]
        path = getattr(self, f"{field}_file")
        if path:
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{field}_file: cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
            found = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
            if not found:
                raise ConfigError(f"{field}_file: {path!r} holds no key")
            keys += [key.encode() for key in found]
        name = getattr(self, f"{field}_env")
        if name:
            value = os.environ.get(name)
            if value is None:
                raise ConfigError(f"{field}_env: the environment variable {name!r} is not set")
            found = [key for key in re.split(r"[,\s]+", value) if key]
            if not found:
                raise ConfigError(f"{field}_env: {name!r} holds no key")
            keys += [key.encode() for key in found]
        return keys

    def resolve_all_keys(self) -> dict[str, list[bytes]]:
        """Every key source, checked at once: one line per problem, as `load_config` does."""
        out: dict[str, list[bytes]] = {}
        problems: list[str] = []
        for field in ("api_keys", "admin_api_keys", "upstream_api_key"):
            try:
                out[field] = self.resolve_keys(field)
            except ConfigError as exc:
                problems.append(str(exc))
        if len(out.get("upstream_api_key", ())) > 1:
            problems.append("upstream_api_key: set it in one place only (the key, _file or _env), and one key")
        if self.protect_metrics and not problems and not (out["api_keys"] or out["admin_api_keys"]):
            problems.append("protect_metrics: needs api_keys or admin_api_keys (or their _file / _env) to be set")
        if problems:
            raise ConfigError(f"invalid gateway config ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
        return out

    def static_urls(self) -> list[str]:
        """Static URLs, including the embedded simulators' addresses."""
        if self.discovery.kind != "static":
            return []
        urls = list(self.discovery.urls)
        if self.simulators is not None:
            sims = self.simulators
            urls += [f"http://{sims.host}:{sims.base_port + i}" for i in range(sims.replicas)]
        return urls


class ConfigError(ValueError):
    """Raised at start-up with a message a user can act on."""


def load_config(args: dict[str, Any] | None) -> GatewayConfig:
    """Validate Serve application args into a GatewayConfig, or explain what is wrong."""
    try:
        return GatewayConfig.model_validate(args or {})
    except ValidationError as exc:
        lines = [f"invalid gateway config ({exc.error_count()} problem(s)):"]
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
