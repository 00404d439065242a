"""Kubernetes discovery: list + watch vLLM pods and mirror them into the replica table.

The loop follows what kopf and client-go informers learnt the hard way:
- list, then watch from the list's resourceVersion, with bookmarks;
- on 410 Gone, a watch error or a dropped connection, list again and reconcile with
  `replace_all`, so a pod deleted while the watch was down cannot survive as a ghost;
- reconnect with capped exponential backoff, and re-list on a fixed resync period;
- while the API server is unreachable, keep the last view and say since when it is stale;
- `synced` only once a list has succeeded: a source that never listed has seen nothing,
  and its empty table must not pass for "no pods".

Credentials are looked for as kubectl and kopf do: `discovery.kubeconfig` if set; in a pod,
its service account; else `$KUBECONFIG`; else `~/.kube/config`. Finding none is a
configuration error, raised at start-up (not retried for ever in the watch thread).

The blocking client runs in one thread; every change is handed to the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config import ConfigError, KubernetesDiscovery
from ...replicas import DiscoveryStatus, Endpoint
from .base import DiscoverySink
from .pods import endpoint_from_pod, pod_replica_id

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 500
CONNECT_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 10.0


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_KUBECONFIG = "~/.kube/config"


@dataclass(frozen=True, slots=True)
class Credentials:
    """Where the Kubernetes client gets its credentials: a kubeconfig, or (None) the pod's service account."""

    kubeconfig: str | None
    description: str


def resolve_credentials(config: KubernetesDiscovery) -> Credentials:
    """Find credentials as kubectl and kopf do, or raise a ConfigError that says what to set."""
    if config.kubeconfig:
        path = os.path.expanduser(config.kubeconfig)
        if not os.path.isfile(path):
            raise ConfigError(f"discovery.kubeconfig: no such file: {config.kubeconfig}")
        return Credentials(path, f"kubeconfig {path} (discovery.kubeconfig)")
    token = os.path.join(SERVICE_ACCOUNT_DIR, "token")
    in_pod = os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT")
    if in_pod and os.path.isfile(token):
        return Credentials(None, "in-cluster service account")
    listed = [path for path in os.environ.get("KUBECONFIG", "").split(os.pathsep) if path]
    found = [path for path in listed if os.path.isfile(os.path.expanduser(path))]
    if found:
        return Credentials(os.pathsep.join(os.path.expanduser(path) for path in found), f"$KUBECONFIG ({', '.join(found)})")
    default = os.path.expanduser(DEFAULT_KUBECONFIG)
    if os.path.isfile(default):
        return Credentials(default, f"kubeconfig {default}")
    not_in_pod = (
        f"no service account token at {token}" if in_pod else "not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set)"
    )
    kubeconfig = f"$KUBECONFIG names no existing file ({os.environ['KUBECONFIG']})" if listed else "$KUBECONFIG is not set"
    raise ConfigError(
        f"discovery.kind=kubernetes found no Kubernetes credentials: {not_in_pod}, {kubeconfig}, "
        f"and there is no {DEFAULT_KUBECONFIG}. Set discovery.kubeconfig to a kubeconfig path, "
        "or run in a pod with a service account"
    )


class _WatchExpired(Exception):
    """410 Gone: our resourceVersion is too old; only a fresh list can recover."""


def _interrupt(response: Any) -> None:
    """Wake a thread blocked reading `response`, from another thread, without blocking.

    Not `response.close()`: the reader holds the buffered file's lock while it waits, so
    close() would wait for the next event or the end of the watch (minutes), freezing
    the event loop that called it. Shutting the socket down ends the read at once; the
    watch thread then closes the response itself.
    """
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def describe_failure(exc: BaseException, namespace: str | None) -> str:
    """Say what went wrong in words an operator can act on (RBAC is the usual suspect)."""
    status = getattr(exc, "status", None)
    where = f"namespace {namespace!r}" if namespace else "all namespaces"
    if status == 403:
        return (
            f"Kubernetes API forbids reading pods in {where} (403): the gateway's ServiceAccount "
            "needs get, list and watch on pods (see kuberay/rbac.yaml)"
        )
    if status == 401:
        return "Kubernetes API rejected the gateway's credentials (401)"
    if isinstance(status, int):
        return f"Kubernetes API error {status}: {getattr(exc, 'reason', '')}"[:300]
    return f"Kubernetes API unreachable: {type(exc).__name__}: {str(exc)[:200]}"


class KubernetesSource:
    def __init__(self, config: KubernetesDiscovery, api_client_factory: Callable[[], Any] | None = None) -> None:
        self._config = config
        # Resolved here, in the health actor's constructor: missing credentials fail the start-up.
        self._credentials = resolve_credentials(config) if api_client_factory is None else None
        self._api_client_factory = api_client_factory or self._default_api_client
        self._stop = threading.Event()
        self._response: Any = None

    async def run(self, sink: DiscoverySink) -> None:
        loop = asyncio.get_running_loop()

        def post(fn: Callable[..., None], *args: Any) -> None:
            loop.call_soon_threadsafe(fn, *args)

        if self._credentials is not None:
            log.info("pod discovery uses %s", self._credentials.description)
        thread = threading.Thread(target=self._loop, args=(post, sink), name="pod-watch", daemon=True)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()
            response = self._response
            if response is not None:
                _interrupt(response)  # unblocks the watch read

    # -- the blocking side ---------------------------------------------------------

    def _default_api_client(self) -> Any:
        from kubernetes import client, config

        assert self._credentials is not None
        if self._credentials.kubeconfig is not None:
            return config.new_client_from_config(config_file=self._credentials.kubeconfig)
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)

    def _loop(self, post: Callable[..., None], sink: DiscoverySink) -> None:
        from kubernetes import client

        api = None
        backoff = 0.2
        synced = False  # a list has succeeded: until then the table holds nothing we saw
        failing_since: float | None = None
        resource_version: str | None = None
        next_resync = 0.0
        while not self._stop.is_set():
            try:
                if api is None:
                    api = client.CoreV1Api(self._api_client_factory())
                if resource_version is None or time.monotonic() >= next_resync:
                    endpoints, resource_version = self._list(api)
                    post(sink.replace_all, endpoints)
                    post(
                        sink.set_discovery_status,
                        DiscoveryStatus(synced=True, message=f"watching {len(endpoints)} pod(s)"),
                    )
                    synced = True
                    failing_since = None
                    next_resync = time.monotonic() + self._config.resync_period_s
                watch_for = max(1, min(self._config.watch_timeout_s, int(next_resync - time.monotonic()) + 1))
                resource_version = self._watch(api, resource_version, watch_for, post, sink)
                # Reset the backoff only once a watch has run its course: a list that works
                # followed by a watch that fails at once (RBAC without "watch") must back off,
                # not re-list every 0.2 s.
                backoff = 0.2
            except _WatchExpired:
                log.info("pod watch expired (410 Gone); re-listing")
                resource_version = None
            except Exception as exc:  # noqa: BLE001 - any failure means: re-list after a backoff
                if self._stop.is_set():
                    return
                resource_version = None
                if failing_since is None:
                    failing_since = time.time()
                message = describe_failure(exc, self._config.namespace)
                log.warning("%s; retrying in %.1fs", message, backoff)
                post(
                    sink.set_discovery_status,
                    DiscoveryStatus(synced=synced, stale_since=failing_since, message=message),
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _list_call(self, api: Any) -> Callable[..., Any]:
        if self._config.namespace:
            return lambda **kw: api.list_namespaced_pod(self._config.namespace, **kw)
        return api.list_pod_for_all_namespaces

    def _list(self, api: Any) -> tuple[list[Endpoint], str]:
        call = self._list_call(api)
        endpoints: list[Endpoint] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": self._config.label_selector, "limit": LIST_PAGE_SIZE}
            if token:
                kwargs["_continue"] = token
            response = call(_preload_content=False, _request_timeout=(CONNECT_TIMEOUT_S, 60), **kwargs)
            body = json.loads(response.data)
            for pod in body.get("items") or ():
                endpoint = endpoint_from_pod(pod, self._config)
                if endpoint is not None:
                    endpoints.append(endpoint)
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return endpoints, meta["resourceVersion"]

    def _watch(
        self,
        api: Any,
        resource_version: str,
        timeout_s: int,
        post: Callable[..., None],
        sink: DiscoverySink,
    ) -> str:
        from kubernetes.watch.watch import iter_resp_lines

        response = self._list_call(api)(
            label_selector=self._config.label_selector,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT_S, timeout_s + 15),
        )
        self._response = response
        try:
            if self._stop.is_set():  # run() was cancelled before it could see this response
                return resource_version
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchExpired()
                    from kubernetes.client.exceptions import ApiException

                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                resource_version = (obj.get("metadata") or {}).get("resourceVersion", resource_version)
                if kind == "BOOKMARK":
                    continue
                endpoint = None if kind == "DELETED" else endpoint_from_pod(obj, self._config)
                if endpoint is None:
                    post(sink.remove, pod_replica_id(obj))
                else:
                    post(sink.upsert, endpoint)
        finally:
            self._response = None
            response.close()
            response.release_conn()
        return resource_version
