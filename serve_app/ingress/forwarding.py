"""Send one request to a replica, retrying on another until a byte has gone to the client.

What may be retried: a refused connection, a reset or timeout before the response
started, and a 5xx status. A stream is committed to the client only when its first
chunk has arrived, so a replica that accepts a stream and dies before producing a
token is retried too. Once a byte is out, a failure ends the stream with an SSE error
event (never a silent cut).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
from collections import deque
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from starlette.responses import Response, StreamingResponse

from routers import Candidate, Estimate, Router, RoutingFacts

from ..config import GatewayConfig
from ..metrics import RequestMetrics
from .errors import GatewayError, no_ready_replica, stream_error_event
from .inflight import InflightLease, InflightTracker
from .local_view import LocalView
from .parsing import ParsedRequest

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})
REPLICA_HEADER = "x-gateway-replica"
ATTEMPTS_HEADER = "x-gateway-attempts"
DONE_MARKER = b"data: [DONE]"
PASSED_HEADERS = ("content-type",)


class Failure(enum.Enum):
    CONNECT = "connect_failed"  # nothing listening: the replica is not there
    RESET = "connection_reset"
    TIMEOUT = "timeout"
    STATUS = "upstream_status"
    REQUEST_LIMIT = "request_time_limit"  # the request's own limit: never the replica's fault
    TOO_LARGE = "response_too_large"  # a non-streamed answer above max_response_bytes: the request's


@dataclass(slots=True)
class _Feedback:
    """What a learning router is told about one attempt once it is over."""

    observe: Callable[[RoutingFacts, Estimate, float | None, float | None], None]
    facts: RoutingFacts
    estimate: Estimate
    sent_at: float
    ttft_s: float | None = None

    def first_byte(self, now: float) -> None:
        """A stream's first chunk (a non-streamed answer's first byte is its last: no TTFT)."""
        self.ttft_s = now - self.sent_at

    def finished(self, now: float) -> None:
        self.observe(self.facts, self.estimate, self.ttft_s, now - self.sent_at)


class _Record:
    """One request's accounting, closed exactly once whatever ends it.

    It holds what must be given back: the in-flight gauge and the request's counter and
    latency, and once a stream is handed to the client its in-flight lease and upstream
    connection. Every path that can end a request (an answer, an exception, a cancelled
    handler, a stream that finishes, breaks or loses its client, or a stream that is
    never iterated at all) calls `finish`; only the first call counts.
    """

    __slots__ = ("_metrics", "model", "started", "done", "replica", "_lease", "_upstream")

    def __init__(self, metrics: RequestMetrics, model: str, started: float) -> None:
        self._metrics = metrics
        self.model = model
        self.started = started
        self.done = False
        self.replica = ""  # the replica that answered, if one did (its id, for metrics)
        self._lease: InflightLease | None = None
        self._upstream: aiohttp.ClientResponse | None = None
        metrics.started(model)

    def hold(self, lease: InflightLease, upstream: aiohttp.ClientResponse) -> None:
        """A stream's lease and connection now live as long as the request, not the attempt."""
        self._lease, self._upstream = lease, upstream

    def finish(self, status: int | str, replica: str, *, reuse_connection: bool = False) -> bool:
        """Close the request's accounting; False if it was already closed."""
        if self.done:
            return False
        self.done = True
        upstream, self._upstream = self._upstream, None
        lease, self._lease = self._lease, None
        if upstream is not None:
            # A fully read body returns its connection to the pool; an unfinished one must
            # not, and closing it is what makes vLLM abort the request and free its slot.
            upstream.release() if reuse_connection else upstream.close()
        if lease is not None:
            lease.release()
        self._metrics.finished(self.model, status, replica, time.monotonic() - self.started)
        return True

    def __del__(self) -> None:
        # Safety net only (a response object dropped without being called): every real
        # path finishes the record explicitly.
        if not self.done:
            try:
                self.finish("abandoned", self._lease.replica_id if self._lease is not None else "")
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


class _RelayedStream(StreamingResponse):
    """A relayed stream that closes its request's record even if its body never starts.

    Starlette sends the response start before it iterates the body: a client that is
    gone by then cancels the response before the relay generator's first step, so the
    generator's own `finally` never runs. This one always does.
    """

    def __init__(self, content: AsyncIterator[bytes], record: _Record, replica: str, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._record = record
        self._replica = replica

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # a suspended relay runs its own finally
            finally:
                self._record.finish("client_disconnected", self._replica)


@dataclass(slots=True)
class _AttemptError(Exception):
    kind: Failure
    detail: str
    status: int | None = None
    body: bytes = b""
    content_type: str = "application/json"


class Forwarder:
    """Per-ingress-replica forwarding: one pooled HTTP session, one in-flight tracker."""

    def __init__(
        self,
        config: GatewayConfig,
        view: LocalView,
        inflight: InflightTracker,
        session: aiohttp.ClientSession,
        report_failure: Callable[[str, str], None],
        metrics: RequestMetrics,
        *,
        slots: int,
        upstream_key: bytes | None = None,
    ) -> None:
        self._config = config
        self._view = view
        self._inflight = inflight
        self._session = session
        self._report_failure = report_failure
        self._metrics = metrics
        self._consecutive_5xx: dict[str, int] = {}
        # vLLM started with --api-key wants it on /v1/*; the client's own key never goes upstream.
        self._auth = {"authorization": "Bearer " + upstream_key.decode()} if upstream_key else {}
        self._shown: dict[str, str] = {}  # replica id -> what clients see in x-gateway-replica
        self._liveness_checks: dict[str, asyncio.Future[str | None]] = {}  # running, per replica
        # Placements to share with the other ingress replicas (None: not shared).
        self.placements: deque[tuple[str, tuple[int, ...]]] | None = None
        self._held = 0  # requests waiting for a replica to start
        self._held_by_model: dict[str, int] = {}  # the same, per model (no zero entries)
        # Each held request occupies one of this replica's `slots` Serve slots: bounded below them.
        self._hold_limit, self._hold_limit_per_model = config.hold.limits(slots)

    async def forward(
        self, path: str, body: bytes, parsed: ParsedRequest, request_id: str, router: Router
    ) -> Response:
        record = _Record(self._metrics, parsed.facts.model, time.monotonic())
        try:
            response = await self._forward(path, body, parsed, request_id, router, record)
        except BaseException:
            record.finish("cancelled", "")
            raise
        if not isinstance(response, _RelayedStream):  # a stream's record is closed by the stream
            record.finish(response.status_code, record.replica)
        return response

    async def _forward(
        self, path: str, body: bytes, parsed: ParsedRequest, request_id: str, router: Router, record: _Record
    ) -> Response:
        started = record.started
        model = parsed.facts.model
        candidates = self._view.candidates(model, self._inflight.count) or await self._hold(model, started)
        if isinstance(candidates, GatewayError):
            return candidates.response()
        facts = parsed.facts
        ordered = router.choose(facts, candidates)
        placed = getattr(router, "placed", None)
        observe = getattr(router, "observe", None)
        expected = getattr(ordered, "expected", None)
        retries = self._config.retries
        last: _AttemptError | None = None
        tried: list[Candidate] = []
        answered_5xx: list[Candidate] = []  # judged once we know whether the request or the replica is at fault
        for candidate in ordered[: retries.max_attempts]:
            if tried and time.monotonic() - started > retries.budget_s:
                break
            tried.append(candidate)
            lease = self._inflight.acquire(candidate.replica_id)
            if placed is not None:
                placed(facts, candidate)
                if facts.blocks and self.placements is not None:
                    self.placements.append((candidate.replica_id, facts.blocks))
            feedback = None
            if observe is not None and expected is not None and candidate.replica_id in expected:
                estimate = expected[candidate.replica_id]
                self._metrics.routed(facts.model, estimate.cached_tokens, facts.prompt_tokens)
                feedback = _Feedback(observe, facts, estimate, time.monotonic())
            try:
                response = await self._attempt(
                    candidate, path, body, parsed, request_id, lease, record, len(tried), feedback
                )
            except _AttemptError as err:
                lease.release()
                last = err
                log.warning("attempt on %s failed: %s (%s)", candidate.replica_id, err.kind.value, err.detail)
                if err.kind is Failure.STATUS:
                    answered_5xx.append(candidate)
                elif err.kind in (Failure.REQUEST_LIMIT, Failure.TOO_LARGE):
                    break  # the request's own limits: no other replica would do better
                else:
                    self._report(candidate, err.kind, err.detail)
                continue
            except BaseException:
                lease.release()
                raise
            self._count_5xx(answered_5xx, served=True)
            return response
        assert last is not None
        self._count_5xx(answered_5xx, served=False)
        return self._give_up(model, last, tried)

    async def _hold(self, model: str, started: float) -> list[Candidate] | GatewayError:
        """No READY replica: wait for a starting one (no polling: each snapshot wakes us).

        A held request keeps its Serve slot, so holds are bounded in all (below the slot
        count) and per model: one model's cold start cannot take the slots that other
        models and /metrics need. Past a bound: 503 at once, with a short Retry-After.
        """
        hold = self._config.hold
        deadline = started + hold.timeout_s
        if not self._view.has_coming(model):
            return no_ready_replica(model, "no replica is ready and none is starting", self._config.retry_after_s)
        held_here = self._held_by_model.get(model, 0)
        if self._held >= self._hold_limit or held_here >= self._hold_limit_per_model:
            limit = (
                f"{held_here} for this model, limit {self._hold_limit_per_model}"
                if held_here >= self._hold_limit_per_model
                else f"{self._held} in all, limit {self._hold_limit}"
            )
            return no_ready_replica(
                model, f"too many requests are already waiting for replicas to start ({limit})", hold.retry_after_starting_s
            )
        self._held += 1
        self._held_by_model[model] = held_here + 1
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return no_ready_replica(
                        model, f"replicas are still starting after {hold.timeout_s:g}s", hold.retry_after_starting_s
                    )
                await self._view.wait_for_change(remaining)
                candidates = self._view.candidates(model, self._inflight.count)
                if candidates:
                    return candidates
                if not self._view.has_coming(model):
                    return no_ready_replica(model, "no replica is ready and none is starting", self._config.retry_after_s)
        finally:
            self._held -= 1
            left = self._held_by_model[model] - 1
            if left:
                self._held_by_model[model] = left
            else:
                del self._held_by_model[model]

    async def _attempt(
        self,
        candidate: Candidate,
        path: str,
        body: bytes,
        parsed: ParsedRequest,
        request_id: str,
        lease: InflightLease,
        record: _Record,
        attempt: int,
        feedback: _Feedback | None,
    ) -> Response:
        started = record.started
        timeouts = self._config.timeouts
        headers = {"content-type": "application/json", "x-request-id": request_id, **self._auth}
        upstream: aiohttp.ClientResponse | None = None
        loop = asyncio.get_running_loop()
        # Until the first byte, two clocks run. The request's own limit (`total_s` from when
        # it arrived) ends it with a 504 that is the request's problem, not the replica's.
        # At `first_byte_s` the replica is asked whether it still answers at all: a hung one
        # is a replica failure (retried elsewhere, ejected); a live one is just slow.
        hung: list[str] = []
        check: asyncio.Task | None = None
        limit = asyncio.timeout_at(loop.time() + max(0.0, started + timeouts.total_s - time.monotonic()))

        def suspect() -> None:
            nonlocal check
            check = asyncio.ensure_future(self._still_answers(candidate, hung, limit))

        watchdog = loop.call_later(timeouts.first_byte_s, suspect)
        try:
            async with limit:
                upstream = await self._session.post(candidate.url + path, data=body, headers=headers)
                if upstream.status in RETRYABLE_STATUSES:
                    data = await self._read_capped(upstream)
                    raise _AttemptError(
                        Failure.STATUS,
                        f"replica answered {upstream.status}",
                        status=upstream.status,
                        body=data,
                        content_type=upstream.headers.get("content-type", "application/json"),
                    )
                if not (parsed.stream and upstream.status == 200):
                    data = await self._read_capped(upstream)
                    first = b""
                else:
                    first = await upstream.content.readany()
                    if not first:
                        raise _AttemptError(Failure.RESET, "stream closed before its first byte")
        except _AttemptError as err:
            if upstream is not None:
                # A body left unread (too large) must not go back to the pool.
                upstream.close() if err.kind is Failure.TOO_LARGE else upstream.release()
            raise
        except asyncio.CancelledError:
            # The client left (Serve cancels the handler) while the replica works on the
            # prompt: close the connection, or vLLM keeps generating for nobody.
            if upstream is not None:
                upstream.close()
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Refused, unreachable, or a black-holed address that never answers the SYN
            # (`timeouts.connect_s`): nothing was sent, so another replica can be tried.
            raise _AttemptError(Failure.CONNECT, f"{type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            if upstream is not None:
                upstream.close()
            raise _AttemptError(Failure.RESET, f"{type(exc).__name__}: {exc}") from None
        except TimeoutError:
            if upstream is not None:
                upstream.close()
            if hung:
                raise _AttemptError(Failure.TIMEOUT, hung[0]) from None
            raise _AttemptError(Failure.REQUEST_LIMIT, f"timeouts.total_s = {timeouts.total_s:g}s") from None
        finally:
            watchdog.cancel()
            if check is not None:
                check.cancel()

        self._consecutive_5xx.pop(candidate.replica_id, None)
        model = parsed.facts.model
        # x-request-id goes back to the client through Serve's own request-id middleware.
        record.replica = candidate.replica_id
        out_headers = {
            REPLICA_HEADER: self._public_id(candidate.replica_id),
            ATTEMPTS_HEADER: str(attempt),
        }
        for name in PASSED_HEADERS:
            if name in upstream.headers:
                out_headers[name] = upstream.headers[name]
        now = time.monotonic()
        self._metrics.first_byte(model, now - started)
        if not first:
            lease.release()
            upstream.release()
            if feedback is not None and upstream.status == 200:
                feedback.finished(now)
            return Response(data, status_code=upstream.status, headers=out_headers)
        if feedback is not None:
            feedback.first_byte(now)
        record.hold(lease, upstream)
        return _RelayedStream(
            self._relay(upstream, first, candidate, record, feedback),
            record,
            candidate.replica_id,
            status_code=upstream.status,
            headers=out_headers,
        )

    def _public_id(self, replica_id: str) -> str:
        """What a client sees of a replica: its id, unless the id is an internal URL (static
        discovery) and `expose_replica_urls` is off; then a stable opaque id instead."""
        if self._config.expose_replica_urls or "://" not in replica_id:
            return replica_id
        shown = self._shown.get(replica_id)
        if shown is None:
            if len(self._shown) > 4096:
                self._shown.clear()
            shown = self._shown[replica_id] = "replica-" + hashlib.sha256(replica_id.encode()).hexdigest()[:12]
        return shown

    async def _read_capped(self, upstream: aiohttp.ClientResponse) -> bytes:
        """A non-streamed body, read whole, but never more than `max_response_bytes` of it."""
        limit = self._config.max_response_bytes
        declared = upstream.content_length
        if declared is not None and declared > limit:
            raise _AttemptError(Failure.TOO_LARGE, f"the replica announced {declared} bytes")
        data = bytearray()
        while chunk := await upstream.content.readany():
            data += chunk
            if len(data) > limit:
                raise _AttemptError(Failure.TOO_LARGE, f"more than {limit} bytes")
        return bytes(data)

    async def _still_answers(self, candidate: Candidate, hung: list[str], limit: asyncio.Timeout) -> None:
        """No first byte after `first_byte_s`: does the replica still answer a cheap request?

        A replica that answers `/v1/models` (any status below 500) within `probe_timeout_s` is
        alive and the request is only slow: it keeps waiting, up to its `total_s`. One that
        does not is hung: the attempt ends as a replica failure, retried elsewhere.
        """
        why = await self._liveness(candidate)
        if why is None:
            return
        hung.append(
            f"no response within {self._config.timeouts.first_byte_s:g}s (timeouts.first_byte_s), "
            f"and a liveness check of the replica failed: {why}"
        )
        limit.reschedule(asyncio.get_running_loop().time())  # end the attempt now

    async def _liveness(self, candidate: Candidate) -> str | None:
        """Why the replica does not answer, or None if it does. Requests that turn slow together
        (a burst of long generations) share one check per replica, not one each."""
        rid = candidate.replica_id
        check = self._liveness_checks.get(rid)
        if check is None:
            check = self._liveness_checks[rid] = asyncio.ensure_future(self._check_liveness(candidate.url))
            check.add_done_callback(lambda done: self._liveness_checks.pop(rid, None) if self._liveness_checks.get(rid) is done else None)
        return await asyncio.shield(check)  # one waiter leaving does not end the others' check

    async def _check_liveness(self, url: str) -> str | None:
        probe_s = self._config.health.probe_timeout_s
        try:
            async with asyncio.timeout(probe_s):
                async with self._session.get(url + "/v1/models", headers=self._auth) as resp:
                    await resp.read()
                    return None if resp.status < 500 else f"answered {resp.status}"
        except TimeoutError:
            return f"no answer within {probe_s:g}s"
        except (aiohttp.ClientError, ConnectionError) as exc:
            return type(exc).__name__

    async def _relay(
        self,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        candidate: Candidate,
        record: _Record,
        feedback: _Feedback | None,
    ) -> AsyncIterator[bytes]:
        """Pass stream bytes through untouched; end a broken stream with an error event."""
        model, started = record.model, record.started
        idle_s = self._config.timeouts.idle_s
        deadline = started + self._config.timeouts.total_s
        tail = first[-64:]
        outcome = "ok"
        try:
            yield first
            while True:
                left = deadline - time.monotonic()
                wait = min(idle_s, left)
                try:
                    async with asyncio.timeout(max(wait, 0.001)):
                        chunk = await upstream.content.readany()
                except TimeoutError:
                    # Which limit was waited for, not the clock after it: the loop may wake a
                    # hair before the deadline, which made a time limit look like a silent replica.
                    if left <= idle_s:  # the request's own limit: not the replica's fault
                        outcome = "time_limit"
                        yield stream_error_event(
                            f"the request reached the gateway's time limit of {self._config.timeouts.total_s:g}s",
                            "request_time_limit",
                        )
                        return
                    outcome = "timeout"
                    yield stream_error_event(f"the replica sent nothing for {wait:.0f}s", "upstream_timeout")
                    self._report(candidate, Failure.TIMEOUT, "stream idle timeout")
                    return
                if not chunk:
                    break
                tail = (tail + chunk)[-64:]
                yield chunk
            if DONE_MARKER not in tail:
                outcome = "cut"
                yield stream_error_event("the replica closed the stream before it finished", "upstream_cut")
                self._report(candidate, Failure.RESET, "stream ended without [DONE]")
        except (aiohttp.ClientError, ConnectionError) as exc:
            outcome = "reset"
            yield stream_error_event(f"the replica failed mid-stream: {type(exc).__name__}", "upstream_reset")
            self._report(candidate, Failure.RESET, f"mid-stream {type(exc).__name__}")
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "client_disconnected"
            raise
        finally:
            if outcome == "ok" and feedback is not None:
                feedback.finished(time.monotonic())
            if outcome not in ("ok", "client_disconnected", "time_limit"):
                self._metrics.stream_error(model, candidate.replica_id)
            # Releases the lease, and the connection: back to the pool only when fully read.
            record.finish(200 if outcome == "ok" else outcome, candidate.replica_id, reuse_connection=outcome == "ok")

    def _count_5xx(self, answered_5xx: list[Candidate], served: bool) -> None:
        """Count 5xx answers toward ejection only when the replica, not the request, is at fault.

        If another replica served the request, the ones that answered 5xx failed on their
        own. If two or more replicas answered this same request with 5xx and none served
        it, the failure follows the request (bad input, say): ejecting them would let one
        bad request take the fleet out, so none is counted.
        """
        if not answered_5xx or (not served and len(answered_5xx) > 1):
            if answered_5xx:
                log.warning("%d replicas answered the same request with 5xx: not counted against them", len(answered_5xx))
            return
        for candidate in answered_5xx:
            count = self._consecutive_5xx.get(candidate.replica_id, 0) + 1
            if count < self._config.health.eject_after_failures:
                self._consecutive_5xx[candidate.replica_id] = count
                continue
            self._consecutive_5xx.pop(candidate.replica_id, None)
            self._report(candidate, Failure.STATUS, f"{count} consecutive 5xx answers")

    def _report(self, candidate: Candidate, kind: Failure, detail: str) -> None:
        self._view.eject_locally(candidate.replica_id, self._config.health.ejection_base_s)
        self._report_failure(candidate.replica_id, f"{kind.value}: {detail}")

    def _give_up(self, model: str, last: _AttemptError, tried: list[Candidate]) -> Response:
        """Every attempt failed before a byte went out: answer with what best tells the client why."""
        attempts = {ATTEMPTS_HEADER: str(len(tried))}
        if last.kind is Failure.STATUS and last.status is not None:
            headers = {**attempts, "content-type": last.content_type}
            if last.status == 503:
                headers["retry-after"] = str(self._config.retry_after_s)
            return Response(last.body, status_code=last.status, headers=headers)
        if last.kind is Failure.REQUEST_LIMIT:
            err = GatewayError(
                504, f"the request reached the gateway's time limit ({last.detail})",
                type="timeout_error", code="request_time_limit",
            )
            return err.response(attempts)
        if last.kind is Failure.TIMEOUT:
            err = GatewayError(
                504, f"the replica did not answer in time ({last.detail})", type="timeout_error", code="upstream_timeout"
            )
            return err.response(attempts)
        if last.kind is Failure.TOO_LARGE:
            limit = self._config.max_response_bytes
            err = GatewayError(
                502, f"the replica's answer is larger than the gateway's limit of {limit} bytes (max_response_bytes); "
                "ask for less, or stream it", type="upstream_error", code="upstream_response_too_large",
            )
            return err.response(attempts)
        if last.kind is Failure.CONNECT:
            return no_ready_replica(
                model, "no replica tried accepted a connection", self._config.retry_after_s
            ).response(attempts)
        # The detail (in the log) can name the replica's address: the client gets the kind only.
        err = GatewayError(
            502, f"the replica failed before answering ({last.detail.split(':', 1)[0]})",
            type="upstream_error", code="upstream_reset",
        )
        return err.response(attempts)
