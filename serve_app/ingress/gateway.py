"""The ingress deployment: OpenAI-compatible routes in front of the vLLM replicas.

A request never waits on the health actor: each ingress replica keeps its own copy of
the replica table, refreshed by a background long-poll, and keeps serving on its last
copy while the actor is away.
"""


import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from routers import ROUTER_NAMES, PrefixIndex, Router, build_router

from ..background import BackgroundLoops
from ..config import GatewayConfig, load_config
from ..metrics import UNKNOWN_MODEL, RequestMetrics
from .errors import GatewayError, bad_request, error_body, model_not_found, model_unconfirmed, no_ready_replica
from .forwarding import Forwarder
from .inflight import InflightTracker
from .kv_events import KVEventConsumer
from .local_view import LocalView
from .parsing import parse_request
from .tokenizer import build_tokenizer

log = logging.getLogger("ray.serve")

METRICS_PUSH_INTERVAL_S = 1.0
# This replica drops a gone vLLM replica's series this long after the fleet aggregate has.
METRICS_FORGET_MARGIN_S = 60.0
MAX_SHARED_PLACEMENTS = 4096  # outbox bound if the actor is away
FIRST_SNAPSHOT_WAIT_S = 30.0
MAX_PENDING_REPORTS = 256
SESSION_HEADER = "x-session-id"
MAX_ONGOING_REQUESTS = 1000  # the Gateway's Serve slots unless the Serve config sets its own

app = FastAPI(title="LLM gateway", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(GatewayError)
async def _gateway_error(request: Request, exc: GatewayError) -> Response:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return bad_request(str(exc)).response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return Response(
        error_body(str(exc.detail), "invalid_request_error", code),
        status_code=exc.status_code,
        media_type="application/json",
    )


@app.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> Response:
    # A 500 from the gateway itself is a bug: log it loudly, still answer in OpenAI's shape.
    log.exception("unhandled error on %s", request.url.path)
    return Response(
        error_body(f"internal gateway error: {type(exc).__name__}", "server_error", "gateway_bug"),
        status_code=500,
        media_type="application/json",
    )


class KeyChecker:
    """A presented key checked against every configured key in constant time.

    Both sides are compared as SHA-256 digests (equal lengths, so the comparison says
    nothing about a key's length), and every key is compared every time, so the time
    taken does not tell which key matched, or how far a guess got.
    """

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._digests = tuple(hashlib.sha256(key).digest() for key in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, token: str) -> bool:
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:] if header[:7].lower() == "bearer " else ""


def _invalid_key() -> GatewayError:
    return GatewayError(401, "Missing or invalid API key.", type="invalid_request_error", code="invalid_api_key")


def public_reason(message: str, parts: int = 1) -> str:
    """The first `parts` clauses of a status message: the kind of problem, not its details
    (which can hold internal addresses or exception text; they stay in /admin/replicas)."""
    return ": ".join(message.split(": ")[:parts])


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"request body is larger than {limit} bytes", type="invalid_request_error", code="request_too_large"
    )


def _serve_slots() -> int:
    """This replica's max_ongoing_requests as Serve runs it (the Serve config may override ours)."""
    try:
        return serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:  # noqa: BLE001 - outside Serve (unit tests)
        return MAX_ONGOING_REQUESTS


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (unit tests)
        return uuid.uuid4().hex[:8]


async def _client_gone(request: Request) -> None:
    """Return once the client has hung up.

    Behind HAProxy or Serve's direct ingress (uvicorn) a handler is not cancelled when its
    client leaves; the server only says so through ASGI `receive`. The body has been read
    by then, so the next message is the disconnect. (Serve's own proxy cancels the handler,
    which cancels this too.)
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


@serve.deployment(
    name="Gateway",
    max_ongoing_requests=MAX_ONGOING_REQUESTS,  # an I/O-bound proxy: requests mostly wait on replicas
    ray_actor_options={"num_cpus": 0.5},
    graceful_shutdown_timeout_s=60,
    graceful_shutdown_wait_loop_s=1,
)
@serve.ingress(app)
class Gateway:
    async def __init__(
        self,
        config: dict[str, Any] | GatewayConfig | None,
        health: DeploymentHandle,
        simulators: DeploymentHandle | None = None,
    ) -> None:
        self._config = config if isinstance(config, GatewayConfig) else load_config(config)
        keys = self._config.resolve_all_keys()  # files and variables are read here, where the gateway runs
        self._client_keys = KeyChecker(keys["api_keys"])
        self._admin_keys = KeyChecker(keys["admin_api_keys"])
        self._health = health
        self._simulators = simulators  # bound only so the demo's replicas are deployed with the app
        self._id = _replica_id()
        timeouts = self._config.timeouts
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, connect=timeouts.connect_s, sock_connect=timeouts.connect_s),
            auto_decompress=False,
        )
        self._view = LocalView()
        self._inflight = InflightTracker()
        routing = self._config.routing
        self._index = PrefixIndex(routing.max_index_blocks)
        self._routers: dict[str, Router] = {
            name: build_router(
                name, max_load_age_s=self._config.max_load_age_s(), index=self._index
            )
            for name in ROUTER_NAMES
        }
        self._tokenizer = build_tokenizer(routing.tokenizer)
        self._kv_events = KVEventConsumer(routing.kv_events, self._index) if routing.precise else None
        self._metrics = RequestMetrics()
        self._pending_reports: set[asyncio.Task] = set()
        self._forwarder = Forwarder(
            self._config, self._view, self._inflight, self._session, self._report_failure, self._metrics,
            slots=_serve_slots(), upstream_key=(keys["upstream_api_key"] or [None])[0],
        )
        self._loops = BackgroundLoops()
        self._loops.start("snapshot-poll", self._poll_snapshots())
        self._loops.start("load-poll", self._poll_loads())
        self._loops.start("metrics-push", self._push_metrics())
        if self._config.routing.share_placements_s is not None:
            self._forwarder.placements = deque(maxlen=MAX_SHARED_PLACEMENTS)
            self._loops.start("placements-push", self._push_placements(self._forwarder.placements))
            self._loops.start("placements-poll", self._poll_placements())
        if not await self._view.wait_for_change(FIRST_SNAPSHOT_WAIT_S):
            log.warning("no replica view after %.0fs; answering 503 until one arrives", FIRST_SNAPSHOT_WAIT_S)

    # -- background -------------------------------------------------------------------

    def check_health(self) -> None:
        self._loops.check()

    async def _poll_snapshots(self) -> None:
        epoch: str | None = None
        version = -1
        backoff = 0.05
        while True:
            try:
                snapshot = await self._health.snapshot_since.remote(epoch, version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the actor is away: keep the last view
                log.warning("replica-health actor unreachable (%s); serving on the last view", type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if snapshot is None:
                continue
            self._view.apply(snapshot)
            live = self._view.replica_ids()
            self._inflight.forget(live)
            for router in self._routers.values():
                forget = getattr(router, "forget_replicas", None)
                if forget is not None:
                    forget(live)
            if self._kv_events is not None:
                self._kv_events.sync(self._view.ready_replicas())
            epoch, version = snapshot.epoch, snapshot.version

    async def _poll_loads(self) -> None:
        """Load samples arrive on their own long-poll, several times a second, without the table."""
        epoch: str | None = None
        version = -1
        backoff = 0.05
        while True:
            try:
                update = await self._health.loads_since.remote(epoch, version)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the actor is away; samples age and stop being trusted
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if update is None:
                continue
            self._view.apply_loads(update, self._inflight.count)
            epoch, version = update.epoch, update.version

    async def _push_placements(self, outbox: deque[tuple[str, tuple[int, ...]]]) -> None:
        """Tell the other ingress replicas where this one placed prompts (off the request path)."""
        interval = self._config.routing.share_placements_s
        while True:
            await asyncio.sleep(interval)
            if not outbox:
                continue
            batch = list(outbox)
            outbox.clear()
            try:
                await self._health.share_placements.remote(self._id, batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a lost batch only costs some cache hits
                pass

    async def _poll_placements(self) -> None:
        """Others' placements go into this replica's prefix index as if it had made them."""
        seq = 0
        while True:
            try:
                seq, placements = await self._health.placements_since.remote(self._id, seq)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the actor is away: carry on with what we know
                await asyncio.sleep(1.0)
                continue
            live = set(self._view.replica_ids())
            for replica_id, keys in placements:
                if replica_id in live:
                    self._index.add(replica_id, keys)

    async def _push_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PUSH_INTERVAL_S)
            if self._view.has_snapshot:
                ttl = self._config.metrics.replica_series_ttl_s + METRICS_FORGET_MARGIN_S
                self._metrics.forget_replicas(self._view.replica_ids(), ttl)
            try:
                await self._health.push_metrics.remote(self._id, self._metrics.export())
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - next push carries the cumulative figures anyway
                pass

    def _report_failure(self, replica_id: str, reason: str) -> None:
        if len(self._pending_reports) >= MAX_PENDING_REPORTS:
            return  # the actor is slow or away; local ejection already protects this replica

        async def send() -> None:
            try:
                await self._health.report_failure.remote(replica_id, reason)
            except Exception:  # noqa: BLE001
                pass

        task = asyncio.create_task(send())
        self._pending_reports.add(task)
        task.add_done_callback(self._pending_reports.discard)

    # -- OpenAI routes ----------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._proxy(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._proxy(request, "/v1/completions")

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._proxy(request, "/v1/embeddings")

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        self._check_auth(request)
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "llm-gateway"}
            for model in self._view.ready_models()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def _proxy(self, request: Request, path: str) -> Response:
        # Serve's middleware has put the client's x-request-id (or a fresh one) here and
        # echoes it on the response; pass the same id upstream so logs line up.
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        model_label = UNKNOWN_MODEL
        try:
            self._check_auth(request)
            body = await self._read_body(request)
            routing = self._config.routing
            parsed = parse_request(
                path, body, request.headers.get(SESSION_HEADER), routing.block_bytes,
                self._tokenizer, routing.kv_events.block_size,
            )
            model = parsed.facts.model
            if not self._view.has_snapshot:
                raise no_ready_replica(model, "the gateway has no replica view yet", self._config.retry_after_s)
            if not self._view.is_known(model):
                # Unknown only by a view that is current: stale or never-synced discovery may not have seen it yet.
                doubt = self._view.discovery_doubt()
                if doubt is not None:
                    code, why = doubt
                    raise model_unconfirmed(model, code, public_reason(why, 2), self._config.retry_after_s)
                raise model_not_found(model)
            model_label = model
            router = self._router_for(request)
        except GatewayError as err:
            self._metrics.rejected(model_label, err.status)
            return err.response()
        forward = asyncio.ensure_future(self._forwarder.forward(path, body, parsed, request_id, router))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait((forward, gone), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            forward.cancel()
            gone.cancel()
            raise
        if forward.done():
            gone.cancel()
            return forward.result()
        # The client hung up before its answer started: stop waiting on the replica, whose
        # connection the forwarder then closes (vLLM aborts the request and frees its slot).
        forward.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forward
        return Response(status_code=499)  # nobody is there to read it

    def _check_auth(self, request: Request) -> None:
        if self._client_keys and not self._client_keys.accepts(_bearer(request)):
            raise _invalid_key()

    def _check_admin(self, request: Request) -> None:
        """/admin/* shows the replicas' addresses and state: with any key set, it needs an admin key."""
        if self._admin_keys:
            if not self._admin_keys.accepts(_bearer(request)):
                raise _invalid_key()
        elif self._client_keys:
            raise GatewayError(
                403, "The admin routes are closed: API keys are set but no admin key is. Set admin_api_keys "
                "(or admin_api_keys_file / admin_api_keys_env) to open them.",
                type="permission_error", code="admin_closed",
            )

    def _check_metrics(self, request: Request) -> None:
        if not self._config.protect_metrics:
            return
        token = _bearer(request)
        if not (self._client_keys.accepts(token) | self._admin_keys.accepts(token)):
            raise _invalid_key()

    async def _read_body(self, request: Request) -> bytes:
        limit = self._config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        seconds = self._config.timeouts.request_body_s
        try:
            async with asyncio.timeout(seconds):  # a client sending slowly must not hold a slot forever
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise _too_large(limit)
        except TimeoutError:
            raise GatewayError(
                408, f"the request body did not arrive within {seconds:g}s (timeouts.request_body_s)",
                type="invalid_request_error", code="request_timeout",
            ) from None
        return bytes(body)

    def _router_for(self, request: Request) -> Router:
        name = request.headers.get(self._config.router_header)
        if name is None:
            return self._routers[self._config.router]
        router = self._routers.get(name)
        if router is None:
            raise bad_request(
                f"unknown router {name!r} in {self._config.router_header}; choose one of: {', '.join(ROUTER_NAMES)}"
            )
        return router

    # -- operations ---------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(self) -> Response:
        snapshot = self._view.snapshot
        if snapshot is None:
            return JSONResponse({"ready": False, "reason": "no replica view yet"}, status_code=503)
        # Open to anyone: the kind of problem only, never an address or error text (/admin/replicas has those).
        discovery = public_reason(snapshot.discovery.message)
        if not snapshot.discovery.synced:  # until discovery has listed once, its view is no view
            return JSONResponse(
                {"ready": False, "reason": f"replica discovery has not synced yet: {discovery}",
                 "discovery": discovery},
                status_code=503,
            )
        return JSONResponse(
            {
                "ready": True,
                "view_version": snapshot.version,
                "stale": snapshot.discovery.stale_since is not None,
                "stale_since": snapshot.discovery.stale_since,
                "discovery": discovery,
            }
        )

    @app.get("/admin/replicas")
    async def replicas(self, request: Request) -> Response:
        self._check_admin(request)
        snapshot = self._view.snapshot
        if snapshot is None:
            return JSONResponse({"replicas": [], "reason": "no replica view yet"}, status_code=503)
        return JSONResponse(
            {
                "ingress_replica": self._id,
                "epoch": snapshot.epoch,
                "version": snapshot.version,
                "received_at": self._view.received_at,
                "discovery": {
                    "synced": snapshot.discovery.synced,
                    "stale": snapshot.discovery.stale_since is not None,
                    "stale_since": snapshot.discovery.stale_since,
                    "message": snapshot.discovery.message,
                },
                "replicas": [
                    {
                        **view.as_dict(),
                        "in_flight_here": self._inflight.count(view.replica_id),
                        "load": self._load_dict(view.replica_id),
                        "prefix_index_blocks": self._index.blocks_of(view.replica_id),
                        "kv_events": self._kv_events.status(view.replica_id) if self._kv_events else None,
                    }
                    for view in snapshot.replicas
                ],
                "routing": {
                    "default_router": self._config.router,
                    "prefix_index": self._index_mode(),
                    "prefix_index_entries": len(self._index),
                    "prefix_index_max_entries": self._index.max_blocks,
                    "prefix_index_bytes_estimate": self._index.memory_bytes(),
                    "learned": self._learned(),
                },
            }
        )

    def _learned(self) -> dict[str, Any]:
        """What the cost-based routers have learned per model (their rates, in seconds)."""
        out: dict[str, Any] = {}
        for name, router in self._routers.items():
            models = getattr(router, "learned", None)
            if callable(models):
                out[name] = models()
        return out

    def _index_mode(self) -> str:
        routing = self._config.routing
        if routing.precise:
            return ("precise: the replicas' KV events, plus this replica's own placements until they confirm them, "
                    "each replica's cache modelled as an LRU of its size")
        why = "routing.kv_events.enabled is false" if not routing.kv_events.enabled else (
            "KV events are on but routing.tokenizer.kind is none: requests cannot be keyed like the replicas' blocks"
        )
        source = "routing decisions (this replica's, and the other ingress replicas' shared through the health actor)"
        if routing.share_placements_s is None:
            source = "this replica's own routing decisions"
        return f"approximate: learned from {source} ({why})"

    def _load_dict(self, replica_id: str) -> dict[str, Any] | None:
        sample = self._view.loads.get(replica_id)
        if sample is None:
            return None
        return {
            "running": sample.running,
            "waiting": sample.waiting,
            "kv_cache_usage": sample.kv_cache_usage,
            "age_s": round(max(0.0, time.time() - sample.scraped_at), 3),
            "slots": sample.slots,
            "cache_tokens": sample.cache_tokens,
        }

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self._check_metrics(request)
        try:
            await self._health.push_metrics.remote(self._id, self._metrics.export())
            text = await asyncio.wait_for(self._health.metrics_text.remote(), timeout=5.0)
        except Exception as exc:  # noqa: BLE001
            return GatewayError(
                503, f"metrics aggregator unavailable ({type(exc).__name__})",
                type="service_unavailable_error", code="metrics_unavailable", retry_after_s=1,
            ).response()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def __del__(self) -> None:
        self._loops.cancel()
        if self._kv_events is not None:
            self._kv_events.close()
        await self._session.close()

