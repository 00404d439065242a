"""Read just what routing needs from a request body; the body itself goes upstream untouched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from routers import RoutingFacts
from routers.prefix import BYTES_PER_TOKEN, DEFAULT_BLOCK_BYTES, render_messages, stable_key, text_blocks, token_blocks

from .errors import bad_request
from .tokenizer import PromptTokenizer

@dataclass(frozen=True, slots=True)
class ParsedRequest:
    facts: RoutingFacts
    stream: bool


def _prompt_text(path: str, payload: dict[str, Any]) -> str:
    """The prompt as the replica will read it (chat: every message, roles included, in order)."""
    if path.endswith("/chat/completions"):
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("`messages` must be a non-empty array", param="messages")
        for message in messages:
            if not isinstance(message, dict):
                raise bad_request("each entry of `messages` must be an object", param="messages")
        return render_messages(messages)
    if path.endswith("/completions"):
        prompt = payload.get("prompt")
        if prompt is None:
            raise bad_request("`prompt` is required", param="prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list):
            return json.dumps(prompt[:1])
        raise bad_request("`prompt` must be a string or an array", param="prompt")
    inp = payload.get("input")  # embeddings
    if inp is None:
        raise bad_request("`input` is required", param="input")
    return inp if isinstance(inp, str) else json.dumps(inp)


def parse_request(
    path: str,
    body: bytes,
    session_header: str | None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    tokenizer: PromptTokenizer | None = None,
    block_size: int = 16,
) -> ParsedRequest:
    """Validate the routing fields; raise a 400 GatewayError on anything malformed.

    With a ``tokenizer`` the prompt's blocks are keyed by token ids in ``block_size``
    blocks (they match the replicas' KV events); without one, by text blocks.
    """
    if not body:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # not a JSONDecodeError: nesting deeper than Python's stack
        raise bad_request("request body is nested too deeply") from None
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
    try:
        text = _prompt_text(path, payload)
    except RecursionError:  # content nested just under json's limit but too deep to render
        raise bad_request("request content is nested too deeply") from None
    ids = None
    if tokenizer is not None:
        try:
            ids = _token_ids(path, payload, tokenizer)
        except Exception:  # noqa: BLE001 - odd content the replica will judge; route on text instead
            ids = None
    if ids is not None:
        blocks = token_blocks(ids, block_size)
        block_tokens, prompt_tokens = block_size, len(ids)
    else:
        blocks = text_blocks(text, block_bytes)
        block_tokens = max(1, round(block_bytes / BYTES_PER_TOKEN))
        prompt_tokens = round(len(text) / BYTES_PER_TOKEN * _bytes_per_char(text))
    if session_key is not None:
        affinity = stable_key(session_key)
    else:
        affinity = blocks[0] & 0xFFFFFFFF if blocks else stable_key(text)
    facts = RoutingFacts(
        model=model,
        session_key=session_key,
        blocks=tuple(blocks),
        block_tokens=block_tokens,
        prompt_tokens=prompt_tokens,
        affinity_key=affinity,
    )
    return ParsedRequest(facts=facts, stream=stream)


def _token_ids(path: str, payload: dict[str, Any], tokenizer: PromptTokenizer) -> list[int] | None:
    """The replica's token ids for chat and completions prompts (None: not a prompt we tokenise)."""
    if path.endswith("/chat/completions"):
        return tokenizer.chat(payload["messages"])
    if path.endswith("/completions"):
        prompt = payload["prompt"]
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(type(t) is int for t in prompt)):
            return tokenizer.completion(prompt)
    return None


def _bytes_per_char(text: str) -> float:
    """Prompt length is estimated from bytes (the blocks are bytes); most prompts are ASCII."""
    return 1.0 if text.isascii() else len(text.encode("utf-8", "surrogatepass")) / max(1, len(text))
