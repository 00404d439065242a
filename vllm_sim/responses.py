"""Response bodies and SSE chunks shaped like vLLM's OpenAI-compatible server.

vLLM serialises with pydantic (compact JSON, no spaces) and Starlette's JSONResponse
(`ensure_ascii=False`); we do the same so byte-level comparisons look realistic.
Stream chunks reuse a per-request JSON prefix so a chunk costs one small `json.dumps`.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Literal

Kind = Literal["chat", "completion"]

DONE = b"data: [DONE]\n\n"

# One encoder for all calls: json.dumps with options builds a new encoder every time.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact JSON, like pydantic's model_dump_json / Starlette's JSONResponse."""
    return _encode(obj).encode()


@lru_cache(maxsize=4096)
def _json_str(text: str) -> bytes:
    """Encoded token text; the vocabulary is small, so this is nearly always a cache hit."""
    return _encode(text).encode()


def error_type(status: int) -> str:
    """vLLM's `type` for an error status (BadRequestError, NotFoundError, ...)."""
    if status == 500:
        return "InternalServerError"
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    return phrase.replace(" ", "").replace("-", "") + "Error"


def error_dict(message: str, status: int, err_type: str | None = None) -> dict[str, Any]:
    """The vLLM >= 0.10.1 error object: code is the integer HTTP status."""
    return {
        "error": {
            "message": message,
            "type": err_type or error_type(status),
            "param": None,
            "code": status,
        }
    }


def error_body(message: str, status: int, err_type: str | None = None) -> bytes:
    return dumps(error_dict(message, status, err_type))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def models_body(models: Sequence[str], max_model_len: int, created: int) -> bytes:
    return dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": name,
                    "parent": None,
                    "max_model_len": max_model_len,
                    "permission": [],
                }
                for name in models
            ],
        }
    )


def chat_completion_body(
    request_id: str, created: int, model: str, text: str, finish_reason: str,
    prompt_tokens: int, completion_tokens: int,
) -> bytes:
    return dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        # vLLM drops an empty tool_calls list; its reasoning field is `reasoning`
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


def completion_body(
    request_id: str, created: int, model: str, text: str, finish_reason: str,
    prompt_tokens: int, completion_tokens: int,
) -> bytes:
    return dumps(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens),
            "kv_transfer_params": None,
        }
    )


def embedding_body(
    request_id: str, created: int, model: str, vectors: Sequence[Sequence[float]],
    encoding_format: str, prompt_tokens: int,
) -> bytes:
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = list(vector)
        if encoding_format == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding = base64.b64encode(packed).decode()
        data.append({"index": index, "object": "embedding", "embedding": embedding})
    return dumps(
        {
            "id": request_id,
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": usage(prompt_tokens, 0),
        }
    )


def render_body(
    kind: Literal["chat", "completion"], request_id: str, model: str, token_ids: Sequence[int],
    max_tokens: int, ignore_eos: bool, stream: bool,
) -> bytes:
    """vLLM's /render answer: the token-in request (`GenerateRequest`) a prompt becomes.

    Completions answer a list (one entry per prompt), chat a single object.
    """
    generate_request: dict[str, Any] = {
        "request_id": request_id,
        "token_ids": list(token_ids),
        "token_offsets": None,
        "features": None,
        "sampling_params": {"n": 1, "max_tokens": max_tokens, "ignore_eos": ignore_eos},
        "model": model,
        "output_mode": "tokens",
        "stream": stream,
        "stream_options": None,
        "cache_salt": None,
        "priority": 0,
        "kv_transfer_params": None,
    }
    if kind == "chat":
        generate_request["assistant_tokens_mask"] = None
        return dumps(generate_request)
    return dumps([generate_request])


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class StreamChunks:
    """Builds the SSE events of one streamed chat or text completion."""

    __slots__ = ("_kind", "_head", "_usage_head", "_tail", "_last_tail")

    def __init__(self, kind: Kind, request_id: str, created: int, model: str) -> None:
        self._kind = kind
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        common = (
            b'{"id":' + dumps(request_id) + b',"object":"' + obj.encode()
            + b'","created":' + str(created).encode() + b',"model":' + dumps(model)
        )
        self._usage_head = b"data: " + common + b',"choices":[],"usage":'
        if kind == "chat":
            self._head = b"data: " + common + b',"choices":[{"index":0,"delta":{"content":'
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
            self._last_tail = b'},"logprobs":null,"finish_reason":%s,"stop_reason":null}]}\n\n'
        else:
            self._head = b"data: " + common + b',"choices":[{"index":0,"text":'
            self._tail = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            self._last_tail = b',"logprobs":null,"finish_reason":%s,"stop_reason":null}]}\n\n'

    def role(self) -> bytes:
        """First chat chunk: `delta: {"role": "assistant", "content": ""}`."""
        return self._head[: -len(b'"content":')] + b'"role":"assistant","content":""' + self._tail

    def token(self, text: str, finish_reason: str | None = None) -> bytes:
        """One content chunk; the last one carries the finish_reason."""
        if finish_reason is None:
            return self._head + _json_str(text) + self._tail
        return self._head + _json_str(text) + self._last_tail % _json_str(finish_reason)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The `include_usage` chunk: empty choices, totals (no None fields, as vLLM)."""
        body = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }
        return self._usage_head + dumps(body) + b"}\n\n"

    @staticmethod
    def error(message: str, status: int = 500, err_type: str | None = None) -> bytes:
        """The graceful mid-stream failure event (followed by [DONE])."""
        return sse(error_body(message, status, err_type))
