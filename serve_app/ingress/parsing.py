"""Read just what routing needs from a request body; the body itself goes upstream untouched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from routers import RoutingFacts

from .errors import bad_request

PREFIX_CHARS = 512  # enough to tell prompts apart for prefix-aware routing, cheap to keep


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    facts: RoutingFacts
    stream: bool


def _prompt_prefix(path: str, payload: dict[str, Any]) -> str:
    if path.endswith("/chat/completions"):
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("`messages` must be a non-empty array", param="messages")
        parts: list[str] = []
        size = 0
        for message in messages:
            if not isinstance(message, dict):
                raise bad_request("each entry of `messages` must be an object", param="messages")
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content) if content else ""
            parts.append(text)
            size += len(text)
            if size >= PREFIX_CHARS:
                break
        return "\n".join(parts)[:PREFIX_CHARS]
    if path.endswith("/completions"):
        prompt = payload.get("prompt")
        if prompt is None:
            raise bad_request("`prompt` is required", param="prompt")
        if isinstance(prompt, str):
            return prompt[:PREFIX_CHARS]
        if isinstance(prompt, list):
            return json.dumps(prompt[:1])[:PREFIX_CHARS]
        raise bad_request("`prompt` must be a string or an array", param="prompt")
    inp = payload.get("input")  # embeddings
    if inp is None:
        raise bad_request("`input` is required", param="input")
    return (inp if isinstance(inp, str) else json.dumps(inp))[:PREFIX_CHARS]


def parse_request(path: str, body: bytes, session_header: str | None) -> ParsedRequest:
    """Validate the routing fields; raise a 400 GatewayError on anything malformed."""
    if not body:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise bad_request("request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` is required and must be a non-empty string", param="model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("`stream` must be a boolean", param="stream")
    if stream and path.endswith("/embeddings"):
        raise bad_request("embeddings do not support `stream`", param="stream")
    user = payload.get("user")
    session_key = session_header or (user if isinstance(user, str) and user else None)
    facts = RoutingFacts(model=model, prefix=_prompt_prefix(path, payload), session_key=session_key)
    return ParsedRequest(facts=facts, stream=stream)
