"""HTTP routes of the simulator: vLLM's OpenAI-compatible API plus /sim/* test hooks.

Every /v1/* request goes through the same steps: count it, pass the gates (draining,
fault knobs), validate, take an engine slot, answer, release the slot in `finally`, and
keep a copy of the body bytes written for /sim/record.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import responses
from .config import SimConfig
from .engine import ABORT, ERROR, Engine, Seq
from .faults import Faults
from .generation import Generation, embed, generate
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .protocol import (
    GenerationRequest,
    RequestError,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_json,
)
from .record import ResponseRecord
from .responses import DONE, StreamChunks

JSON = "application/json"
# The message vLLM logs/returns when its engine core process has died.
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."
_LINGER_RST = struct.pack("ii", 1, 0)
_KNOWN_PATHS = frozenset(
    {"/health", "/ping", "/version", "/metrics", "/v1/models", "/v1/chat/completions",
     "/v1/completions", "/v1/embeddings"}
)


@dataclass(slots=True, eq=False)
class Exchange:
    """Per-request bookkeeping: the record key and the body bytes written so far."""

    key: str
    request_id: str | None
    arrival: float
    request: web.Request
    written: list[bytes] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"X-Request-Id": self.request_id} if self.request_id else {}


def reset_connection(transport: asyncio.BaseTransport | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN, like a crashed peer."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    transport.abort()


class SimServer:
    """State shared by the routes of one simulator process."""

    def __init__(self, config: SimConfig, faults: Faults | None = None) -> None:
        self.config = config
        self.faults = faults or Faults()
        self.engine = Engine(
            max_num_seqs=config.max_num_seqs,
            ttft=config.ttft,
            itl=config.itl,
            prefill_per_token=config.prefill_per_token,
            prefix_cache_blocks=config.prefix_cache_blocks,
        )
        self.metrics = Metrics(self.engine, config.served_model, legacy=config.legacy_metrics)
        self.record = ResponseRecord(config.record_capacity)
        self.models = frozenset(config.models)
        self.created = int(time.time())
        self.draining = False
        self.active: set[Exchange] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.requests_total = 0
        self.by_path: dict[str, int] = {}

    def build_app(self) -> web.Application:
        # vLLM has no body limit of its own; long prompts must not hit aiohttp's 1 MiB.
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/ping", self.health),  # vLLM's SageMaker-style alias
                web.get("/version", self.version),
                web.get("/metrics", self.metrics_route),
                web.get("/v1/models", self.list_models),
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/completions", self.completions),
                web.post("/v1/embeddings", self.embeddings),
                web.get("/sim/faults", self.get_faults),
                web.post("/sim/faults", self.set_faults),
                web.delete("/sim/faults", self.reset_faults),
                web.get("/sim/stats", self.stats),
                web.get("/sim/record/{request_id}", self.get_record),
                web.route("*", "/{tail:.*}", self.not_found),
            ]
        )
        return app

    # ----- bookkeeping ---------------------------------------------------------------

    def _count(self, path: str) -> None:
        self.requests_total += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1

    def _begin(self, request: web.Request) -> Exchange:
        self._count(request.path)
        request_id = request.headers.get("X-Request-Id")
        ex = Exchange(request_id or uuid.uuid4().hex, request_id,
                      asyncio.get_running_loop().time(), request)
        self.active.add(ex)
        self.idle.clear()
        return ex

    def _end(self, ex: Exchange) -> None:
        self.active.discard(ex)
        if not self.active:
            self.idle.set()
        self.record.put(ex.key, b"".join(ex.written))

    @property
    def inflight(self) -> int:
        """/v1/* requests being handled (what a drain waits for)."""
        return len(self.active)

    def abort_inflight(self) -> int:
        """Reset the connections of all in-flight /v1/* requests (shutdown mode abort)."""
        active = list(self.active)
        for ex in active:
            reset_connection(ex.request.transport)
        return len(active)

    def _respond(self, ex: Exchange, status: int, body: bytes, content_type: str = JSON) -> web.Response:
        ex.written.append(body)
        return web.Response(status=status, body=body, content_type=content_type, headers=ex.headers())

    def _error(self, ex: Exchange, status: int, message: str, err_type: str | None = None) -> web.Response:
        return self._respond(ex, status, responses.error_body(message, status, err_type))

    async def _gate(self, ex: Exchange) -> web.Response | None:
        """Answer for a /v1/* request that must not reach the engine (drain, faults)."""
        if self.draining:
            return self._error(ex, 503, "The server is shutting down.")
        faults = self.faults
        if faults.unhealthy:
            return self._error(ex, 500, ENGINE_DEAD_MESSAGE, "InternalServerError")
        if faults.error_status is not None:
            return self._error(ex, faults.error_status, f"Simulated error (status {faults.error_status}).")
        if faults.hang:
            await asyncio.get_running_loop().create_future()  # until the client goes away
        return None

    # ----- plain routes --------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        self._count(request.path)
        unhealthy = self.draining or self.faults.unhealthy
        return web.Response(status=503 if unhealthy else 200)

    async def version(self, request: web.Request) -> web.Response:
        self._count(request.path)
        return web.Response(body=b'{"version":"0.11.0-sim"}', content_type=JSON)

    async def metrics_route(self, request: web.Request) -> web.Response:
        self._count(request.path)
        if self.faults.metrics_delay > 0:
            await asyncio.sleep(self.faults.metrics_delay)
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    async def not_found(self, request: web.Request) -> web.Response:
        """FastAPI's answers for unknown paths (404) and known paths with a wrong method (405)."""
        self._count("other")
        if request.path in _KNOWN_PATHS:
            return web.Response(status=405, body=b'{"detail":"Method Not Allowed"}', content_type=JSON)
        return web.Response(status=404, body=b'{"detail":"Not Found"}', content_type=JSON)

    async def list_models(self, request: web.Request) -> web.Response:
        ex = self._begin(request)
        try:
            early = await self._gate(ex)
            if early is not None:
                return early
            body = responses.models_body(self.config.models, self.config.max_model_len, self.created)
            return self._respond(ex, 200, body)
        finally:
            self._end(ex)

    # ----- generation ----------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def _generate(
        self, request: web.Request, parse: Callable[[dict[str, Any]], GenerationRequest]
    ) -> web.StreamResponse:
        ex = self._begin(request)
        try:
            early = await self._gate(ex)
            if early is not None:
                return early
            try:
                req = parse(parse_json(await request.read()))
                model = self._resolve_model(req.model)
                max_tokens = self._max_tokens(req)
            except RequestError as exc:
                return self._error(ex, exc.status, exc.message, exc.err_type)
            plan = generate(model, req.prompt, max_tokens, ignore_eos=req.ignore_eos, seed=self.config.seed)
            request_id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + ex.key
            if req.stream:
                return await self._stream(request, ex, req, model, plan, request_id)
            return await self._unary(request, ex, req, model, plan, request_id)
        finally:
            self._end(ex)

    def _resolve_model(self, model: str | None) -> str:
        if model is None:
            return self.config.models[0]
        if model not in self.models:
            raise RequestError(f"The model `{model}` does not exist.", 404, "NotFoundError")
        return model

    def _max_tokens(self, req: GenerationRequest) -> int:
        """vLLM's context-length rules; the default fills at most --max-tokens-default."""
        limit = self.config.max_model_len
        prompt_len = len(req.prompt_tokens)
        where = "messages" if req.kind == "chat" else "prompt"
        if req.max_tokens is None:
            if prompt_len >= limit:
                raise RequestError(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {prompt_len} tokens in the {where}, Please reduce the length "
                    f"of the {where}."
                )
            return min(self.config.max_tokens_default, limit - prompt_len)
        if prompt_len + req.max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + req.max_tokens} tokens ({prompt_len} in the {where}, "
                f"{req.max_tokens} in the completion). Please reduce the length of the {where} "
                f"or completion."
            )
        return req.max_tokens

    async def _unary(
        self, request: web.Request, ex: Exchange, req: GenerationRequest, model: str,
        plan: Generation, request_id: str,
    ) -> web.StreamResponse:
        engine = self.engine
        seq = await engine.admit(req.prompt_tokens)
        try:
            loop = asyncio.get_running_loop()
            first_token_at = loop.time() + seq.prefill_seconds
            count = plan.completion_tokens
            action = self.faults.mid_stream_action()
            produced = count if action is None else min(action[0], count)
            delay = seq.prefill_seconds + engine.itl * max(0, produced - 1)
            if delay > 0:
                await asyncio.sleep(delay)
            self.metrics.ttft.observe(first_token_at - ex.arrival)
            engine.grow(seq, produced)
            if action is not None:
                return await self._fault(request, ex, seq, action[1], None)
            build = responses.chat_completion_body if req.kind == "chat" else responses.completion_body
            body = build(request_id, int(time.time()), model, plan.text, plan.finish_reason,
                         seq.prompt_len, count)
            seq.outcome = plan.finish_reason
            self.metrics.e2e.observe(loop.time() - ex.arrival)
            return self._respond(ex, 200, body)
        finally:
            engine.release(seq)

    async def _stream(
        self, request: web.Request, ex: Exchange, req: GenerationRequest, model: str,
        plan: Generation, request_id: str,
    ) -> web.StreamResponse:
        # Like Starlette's StreamingResponse, headers go out before the engine runs.
        resp = web.StreamResponse(status=200, headers=ex.headers())
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        engine = self.engine
        seq: Seq | None = None
        try:
            await resp.prepare(request)
            chunks = StreamChunks(req.kind, request_id, int(time.time()), model)
            seq = await engine.admit(req.prompt_tokens)
            loop = asyncio.get_running_loop()
            if seq.prefill_seconds > 0:
                await asyncio.sleep(seq.prefill_seconds)
            self.metrics.ttft.observe(loop.time() - ex.arrival)
            tokens, finish, itl = plan.tokens, plan.finish_reason, engine.itl
            last = len(tokens) - 1
            action = self.faults.mid_stream_action()
            produced = len(tokens) if action is None else min(action[0], len(tokens))
            pending: list[bytes] = [chunks.role()] if req.kind == "chat" else []
            for i in range(produced):
                if i and itl > 0:
                    engine.grow(seq, i)
                    await self._write(resp, ex, pending)
                    pending = []
                    await asyncio.sleep(itl)
                pending.append(chunks.token(tokens[i], finish if i == last else None))
            engine.grow(seq, produced)
            if action is not None:
                await self._write(resp, ex, pending)
                return await self._fault(request, ex, seq, action[1], resp)
            if req.include_usage:
                pending.append(chunks.usage(seq.prompt_len, len(tokens)))
            pending.append(DONE)
            await self._write(resp, ex, pending)
            seq.outcome = finish
            self.metrics.e2e.observe(loop.time() - ex.arrival)
            return resp
        except ConnectionError:
            return resp  # the client went away; the slot is freed below, counted as abort
        finally:
            if seq is not None:
                engine.release(seq)

    @staticmethod
    async def _write(resp: web.StreamResponse, ex: Exchange, pending: list[bytes]) -> None:
        data = b"".join(pending)
        ex.written.append(data)
        await resp.write(data)

    async def _fault(
        self, request: web.Request, ex: Exchange, seq: Seq, action: str,
        resp: web.StreamResponse | None,
    ) -> web.StreamResponse:
        """Fire a mid-stream fault after the chunks before it were written."""
        if action == "error":
            seq.outcome = ERROR
            message = "Simulated failure during generation."
            if resp is None:
                return self._error(ex, 500, message, "InternalServerError")
            await self._write(resp, ex, [StreamChunks.error(message, 500, "InternalServerError"), DONE])
            return resp
        await self._flushed(request)
        if action == "kill":
            os._exit(1)
        seq.outcome = ABORT
        reset_connection(request.transport)
        # Nothing more can be written; aiohttp's own write_eof fails quietly.
        return resp if resp is not None else web.Response()

    @staticmethod
    async def _flushed(request: web.Request, timeout: float = 1.0) -> None:
        """Wait until the transport handed everything to the kernel, so a reset or exit
        does not swallow the chunks the fault promised to deliver."""
        transport = request.transport
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while transport is not None and transport.get_write_buffer_size() and loop.time() < deadline:
            await asyncio.sleep(0.001)

    # ----- embeddings ----------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        ex = self._begin(request)
        try:
            early = await self._gate(ex)
            if early is not None:
                return early
            try:
                req = parse_embedding(parse_json(await request.read()))
                model = self._resolve_model(req.model)
                if req.prompt_tokens > self.config.max_model_len:
                    raise RequestError(
                        f"This model's maximum context length is {self.config.max_model_len} "
                        f"tokens. However, you requested {req.prompt_tokens} tokens in the input "
                        f"for embedding generation. Please reduce the length of the input."
                    )
            except RequestError as exc:
                return self._error(ex, exc.status, exc.message, exc.err_type)
            seq = await self.engine.admit(range(req.prompt_tokens), use_prefix_cache=False)
            try:
                if seq.prefill_seconds > 0:
                    await asyncio.sleep(seq.prefill_seconds)
                action = self.faults.mid_stream_action()
                if action is not None:
                    return await self._fault(request, ex, seq, action[1], None)
                dim, seed = self.config.embedding_dim, self.config.seed
                vectors = [embed(model, text, dim, seed) for text in req.inputs]
                body = responses.embedding_body(
                    "embd-" + ex.key, int(time.time()), model, vectors, req.encoding_format,
                    req.prompt_tokens,
                )
                seq.outcome = "stop"
                return self._respond(ex, 200, body)
            finally:
                self.engine.release(seq)
        finally:
            self._end(ex)

    # ----- /sim/* test hooks ---------------------------------------------------------

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            patch = parse_json(await request.read())
            self.faults.update(patch)
        except RequestError as exc:
            return web.Response(status=400, body=responses.error_body(exc.message, 400), content_type=JSON)
        except ValueError as exc:
            return web.Response(status=400, body=responses.error_body(str(exc), 400), content_type=JSON)
        return web.json_response(self.faults.to_dict())

    async def reset_faults(self, request: web.Request) -> web.Response:
        self.faults.reset()
        return web.json_response(self.faults.to_dict())

    async def stats(self, request: web.Request) -> web.Response:
        engine = self.engine
        return web.json_response(
            {
                "requests_total": self.requests_total,
                "by_path": dict(self.by_path),
                "running": engine.running,
                "waiting": engine.waiting,
                "aborted_total": engine.stats.aborted_total,
                "completed_total": engine.stats.completed_total,
                "failed_total": engine.stats.failed_total,
                "max_seen_running": engine.stats.max_seen_running,
                "inflight": self.inflight,
                "draining": self.draining,
            }
        )

    async def get_record(self, request: web.Request) -> web.Response:
        body = self.record.get(request.match_info["request_id"])
        if body is None:
            return web.Response(
                status=404, body=responses.error_body("No record for that request id.", 404),
                content_type=JSON,
            )
        return web.Response(body=body, content_type="application/octet-stream")
