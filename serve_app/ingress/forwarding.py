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
    ) -> None:
        self._config = config
        self._view = view
        self._inflight = inflight
        self._session = session
        self._report_failure = report_failure
        self._metrics = metrics
        self._consecutive_5xx: dict[str, int] = {}
        # Placements to share with the other ingress replicas (None: not shared).
        self.placements: deque[tuple[str, tuple[int, ...]]] | None = None
        self._held = 0  # requests waiting for a replica to start
        self._held_by_model: dict[str, int] = {}  # the same, per model (no zero entries)
        # Each held request occupies one of this replica's `slots` Serve slots: bounded below them.
        self._hold_limit, self._hold_limit_per_model = config.hold.limits(slots)

    async def forward(
        self, path: str, body: bytes, parsed: ParsedRequest, request_id: str, router: Router
    ) -> Response:
        model = parsed.facts.model
        started = time.monotonic()
        self._metrics.started(model)
        try:
            response = await self._forward(path, body, parsed, request_id, router, started)
        except BaseException:
            self._metrics.finished(model, "cancelled", "", time.monotonic() - started)
            raise
        if not isinstance(response, StreamingResponse):
            replica = response.headers.get(REPLICA_HEADER, "")
            self._metrics.finished(model, response.status_code, replica, time.monotonic() - started)
        return response

    async def _forward(
        self, path: str, body: bytes, parsed: ParsedRequest, request_id: str, router: Router, started: float
    ) -> Response:
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
                    candidate, path, body, parsed, request_id, lease, started, len(tried), feedback
                )
            except _AttemptError as err:
                lease.release()
                last = err
                log.warning("attempt on %s failed: %s (%s)", candidate.replica_id, err.kind.value, err.detail)
                if err.kind is Failure.STATUS:
                    answered_5xx.append(candidate)
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
        started: float,
        attempt: int,
        feedback: _Feedback | None,
    ) -> Response:
        timeouts = self._config.timeouts
        headers = {"content-type": "application/json", "x-request-id": request_id}
        upstream: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(timeouts.first_byte_s):
                upstream = await self._session.post(candidate.url + path, data=body, headers=headers)
                if upstream.status in RETRYABLE_STATUSES:
                    data = await upstream.read()
                    raise _AttemptError(
                        Failure.STATUS,
                        f"replica answered {upstream.status}",
                        status=upstream.status,
                        body=data,
                        content_type=upstream.headers.get("content-type", "application/json"),
                    )
                if not (parsed.stream and upstream.status == 200):
                    data = await upstream.read()
                    first = b""
                else:
                    first = await upstream.content.readany()
                    if not first:
                        raise _AttemptError(Failure.RESET, "stream closed before its first byte")
        except _AttemptError:
            if upstream is not None:
                upstream.release()
            raise
        except aiohttp.ClientConnectorError as exc:
            raise _AttemptError(Failure.CONNECT, str(exc)) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            if upstream is not None:
                upstream.close()
            raise _AttemptError(Failure.RESET, f"{type(exc).__name__}: {exc}") from None
        except TimeoutError:
            if upstream is not None:
                upstream.close()
            raise _AttemptError(Failure.TIMEOUT, f"no response within {timeouts.first_byte_s}s") from None

        self._consecutive_5xx.pop(candidate.replica_id, None)
        model = parsed.facts.model
        # x-request-id goes back to the client through Serve's own request-id middleware.
        out_headers = {
            REPLICA_HEADER: candidate.replica_id,
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
        return StreamingResponse(
            self._relay(upstream, first, candidate, lease, model, started, feedback),
            status_code=upstream.status,
            headers=out_headers,
        )

    async def _relay(
        self,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        candidate: Candidate,
        lease: InflightLease,
        model: str,
        started: float,
        feedback: _Feedback | None,
    ) -> AsyncIterator[bytes]:
        """Pass stream bytes through untouched; end a broken stream with an error event."""
        idle_s = self._config.timeouts.idle_s
        deadline = started + self._config.timeouts.total_s
        tail = first[-64:]
        outcome = "ok"
        try:
            yield first
            while True:
                wait = min(idle_s, deadline - time.monotonic())
                try:
                    async with asyncio.timeout(max(wait, 0.001)):
                        chunk = await upstream.content.readany()
                except TimeoutError:
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
            if outcome == "ok":
                upstream.release()  # fully read: the connection goes back to the pool
                if feedback is not None:
                    feedback.finished(time.monotonic())
            else:
                upstream.close()  # an unfinished body must not return to the pool
            lease.release()
            if outcome not in ("ok", "client_disconnected"):
                self._metrics.stream_error(model, candidate.replica_id)
            self._metrics.finished(model, 200 if outcome == "ok" else outcome, candidate.replica_id, time.monotonic() - started)

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
        if last.kind is Failure.TIMEOUT:
            err = GatewayError(
                504, f"the replica did not answer in time ({last.detail})", type="timeout_error", code="upstream_timeout"
            )
            return err.response(attempts)
        if last.kind is Failure.CONNECT:
            return no_ready_replica(model, "every replica tried refused the connection", self._config.retry_after_s).response(attempts)
        err = GatewayError(502, f"the replica failed ({last.detail})", type="upstream_error", code="upstream_reset")
        return err.response(attempts)
