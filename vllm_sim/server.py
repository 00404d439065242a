"""HTTP routes of the simulator: vLLM's OpenAI-compatible API plus /sim/* test hooks.

Every /v1/* request goes through the same steps: count it, pass the gates (draining,
fault knobs), validate, submit it to the engine, write tokens as the engine's steps
produce them, release the sequence in `finally` (which frees its slot and blocks), and
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
from .engine import ABORT, ERROR, Engine, EngineDead, Seq
from .faults import Faults
from .generation import Generation, embed, generate
from .kv_events import make_publisher
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
from .tokenizer import output_token_id

JSON = "application/json"
# The message vLLM logs/returns when its engine core process has died.
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."
_LINGER_RST = struct.pack("ii", 1, 0)
_KNOWN_PATHS = frozenset(
    {"/health", "/ping", "/version", "/metrics", "/v1/models", "/v1/chat/completions",
     "/v1/completions", "/v1/embeddings", "/reset_prefix_cache", "/v1/completions/render",
     "/v1/chat/completions/render"}
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
        # Binds (or connects) the KV event sockets now: a bad endpoint fails start-up.
        self.publisher = make_publisher(config.kv_events)
        self.engine = Engine(config.engine_config(), self.publisher)
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
                web.post("/v1/chat/completions/render", self.render_chat),
                web.post("/v1/completions/render", self.render_completion),
                web.post("/reset_prefix_cache", self.reset_prefix_cache),
                web.get("/sim/faults", self.get_faults),
                web.post("/sim/faults", self.set_faults),
                web.delete("/sim/faults", self.reset_faults),
                web.get("/sim/stats", self.stats),
                web.get("/sim/record/{request_id}", self.get_record),
                web.route("*", "/{tail:.*}", self.not_found),
            ]
        )
        return app

    def start(self) -> None:
        """Start background work that needs the running loop (KV event replay)."""
        start = getattr(self.publisher, "start", None)
        if start is not None:
            start()

    def close(self) -> None:
        self.publisher.close()

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
        if faults.unhealthy or self.engine.dead is not None:
            return self._error(ex, 500, ENGINE_DEAD_MESSAGE, "InternalServerError")
        if faults.error_status is not None:
            return self._error(ex, faults.error_status, f"Simulated error (status {faults.error_status}).")
        if faults.hang:
            await asyncio.get_running_loop().create_future()  # until the client goes away
        return None

    # ----- plain routes --------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        self._count(request.path)
        unhealthy = self.draining or self.faults.unhealthy or self.engine.dead is not None
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
            marker = self.faults.error_status_for_prompts_containing
            if marker is not None and marker in req.prompt:
                return self._error(ex, 500, "Simulated failure for this prompt.", "InternalServerError")
            plan = generate(model, req.prompt, max_tokens, ignore_eos=req.ignore_eos, seed=self.config.seed)
            request_id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + ex.key
            if req.stream:
                return await self._stream(request, ex, req, model, plan, request_id)
            return await self._unary(request, ex, req, model, plan, request_id)
        finally:
            self._end(ex)

    # ----- render (vLLM's token-in API: what a prompt becomes, no generation) ---------

    async def render_chat(self, request: web.Request) -> web.Response:
        return await self._render(request, parse_chat)

    async def render_completion(self, request: web.Request) -> web.Response:
        return await self._render(request, parse_completion)

    async def _render(
        self, request: web.Request, parse: Callable[[dict[str, Any]], GenerationRequest]
    ) -> web.Response:
        """The prompt's token ids as the engine sees them; routers such as vllm-router's
        kv_aware policy call this to match prompts against KV events."""
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
            prefix = "chatcmpl-" if req.kind == "chat" else "cmpl-"
            body = responses.render_body(req.kind, prefix + ex.key, model, req.prompt_tokens,
                                         max_tokens, req.ignore_eos, req.stream)
            return self._respond(ex, 200, body)
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
        count = plan.completion_tokens
        action = self.faults.mid_stream_action()
        produced = count if action is None else min(action[0], count)
        seq = self._submit(req, plan, produced)
        try:
            loop = asyncio.get_running_loop()
            await engine.wait(seq, produced)  # until the engine is done with it
            self._observe_ttft(seq, ex)
            if action is not None:
                return await self._fault(request, ex, seq, action[1], None)
            build = responses.chat_completion_body if req.kind == "chat" else responses.completion_body
            body = build(request_id, int(time.time()), model, plan.text, plan.finish_reason,
                         seq.prompt_len, count)
            seq.outcome = plan.finish_reason
            self.metrics.e2e.observe(loop.time() - ex.arrival)
            return self._respond(ex, 200, body)
        except EngineDead:
            seq.outcome = ERROR
            return self._error(ex, 500, ENGINE_DEAD_MESSAGE, "InternalServerError")
        finally:
            engine.release(seq)

    def _submit(self, req: GenerationRequest, plan: Generation, produced: int) -> Seq:
        """Hand a request to the engine to produce `produced` of the planned tokens."""
        output_ids = [output_token_id(piece) for piece in plan.tokens[:produced]]
        return self.engine.submit(req.prompt_tokens, produced, output_ids)

    def _observe_ttft(self, seq: Seq, ex: Exchange) -> None:
        if seq.first_token_at is not None:
            self.metrics.ttft.observe(seq.first_token_at - ex.arrival)

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
            tokens, finish = plan.tokens, plan.finish_reason
            last = len(tokens) - 1
            action = self.faults.mid_stream_action()
            produced = len(tokens) if action is None else min(action[0], len(tokens))
            seq = self._submit(req, plan, produced)
            loop = asyncio.get_running_loop()
            pending: list[bytes] = [chunks.role()] if req.kind == "chat" else []
            # When decode steps take no time, one write at the end is what the client
            # would see anyway; waking per token would only burn CPU.
            batch = produced if engine.instant_decode else 0
            sent = 0
            while True:
                await engine.wait(seq, max(sent, batch))
                if sent == 0:
                    self._observe_ttft(seq, ex)
                upto = seq.generated
                for i in range(sent, upto):
                    pending.append(chunks.token(tokens[i], finish if i == last else None))
                sent = upto
                if seq.done:
                    break
                await self._write(resp, ex, pending)  # every batch of tokens as it comes
                pending = []
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
        except EngineDead:
            if seq is not None:
                seq.outcome = ERROR
            await self._write(resp, ex, [StreamChunks.error(ENGINE_DEAD_MESSAGE, 500,
                                                            "InternalServerError"), DONE])
            return resp
        except ConnectionError:
            return resp  # the client went away; the sequence is released below, as abort
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
            # Pooling requests are prefill only and, as in vLLM, skip the prefix cache.
            seq = self.engine.submit([0] * req.prompt_tokens, 0, use_cache=False)
            try:
                await self.engine.wait(seq)
                self._observe_ttft(seq, ex)
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
            except EngineDead:
                seq.outcome = ERROR
                return self._error(ex, 500, ENGINE_DEAD_MESSAGE, "InternalServerError")
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

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's dev endpoint: drop all cached blocks (AllBlocksCleared). Refused (409)
        while running requests hold blocks, where vLLM's reset fails too."""
        self._count(request.path)
        if self.engine.reset_prefix_cache():
            return web.Response(status=200)
        return web.Response(
            status=409, content_type=JSON,
            body=responses.error_body("Failed to reset prefix cache: blocks are in use by "
                                      "running requests.", 409),
        )

    async def stats(self, request: web.Request) -> web.Response:
        engine = self.engine
        stats, pool = engine.stats, engine.pool
        return web.json_response(
            {
                "requests_total": self.requests_total,
                "by_path": dict(self.by_path),
                "running": engine.running,
                "waiting": engine.waiting,
                "aborted_total": stats.aborted_total,
                "completed_total": stats.completed_total,
                "failed_total": stats.failed_total,
                "max_seen_running": stats.max_seen_running,
                "inflight": self.inflight,
                "draining": self.draining,
                "prefix_queries_tokens": stats.prefix_queries_tokens,
                "prefix_hits_tokens": stats.prefix_hits_tokens,
                "num_gpu_blocks": pool.num_blocks,
                "block_size": pool.block_size,
                "free_blocks": pool.num_free,
                "used_blocks": pool.num_blocks - pool.num_free,
                "cached_blocks": pool.num_cached_blocks,
                "evicted_blocks_total": pool.evicted_total,
                "kv_cache_usage": pool.usage,
                "preemptions_total": stats.preemptions_total,
                "steps_total": stats.steps_total,
                "busy_seconds_total": round(stats.busy_seconds, 6),
                "prefill_tokens_total": stats.prefill_tokens_total,
                "prompt_tokens_total": stats.prompt_tokens_total,
                "generation_tokens_total": stats.generation_tokens_total,
                "kv_event_batches_total": self.publisher.published,
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
