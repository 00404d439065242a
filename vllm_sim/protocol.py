"""Parse and validate OpenAI-style request bodies the way vLLM does: bad input is a 400.

The result is a small typed object with just what the simulator needs; unknown fields
are ignored, as vLLM ignores them (with a warning).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from .tokenizer import VOCAB_SIZE, render_chat, token_ids, words


class RequestError(Exception):
    """A client error to answer with vLLM's error body."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A chat or text completion, reduced to what drives the simulation."""

    kind: Literal["chat", "completion"]
    model: str | None
    prompt: str  # the text whose hash decides the output
    prompt_tokens: list[int]  # token ids (tokenizer.py): counting and the KV cache
    max_tokens: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str | None
    inputs: list[str]  # one hash key per input
    prompt_tokens: int
    encoding_format: Literal["float", "base64"]


def parse_json(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"JSON decode error: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("Input should be a valid dictionary or object to extract fields from")
    return body


def _encodable(prompt: str) -> str:
    """vLLM's tokenizer cannot encode a lone surrogate; vLLM answers that with a 400."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(str(exc)) from None
    return prompt


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("Field required: messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
                raise RequestError(f"messages[{i}].content must be a string or a list of parts")
    prompt = _encodable(render_chat(messages))
    max_tokens = _opt_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens")
    return _generation("chat", body, prompt, token_ids(prompt), max_tokens)


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("Field required: prompt")
    prompt_field = body["prompt"]
    if isinstance(prompt_field, list) and len(prompt_field) == 1 and isinstance(
        prompt_field[0], (str, list)
    ):
        prompt_field = prompt_field[0]  # a batch of one
    if isinstance(prompt_field, str):
        prompt, tokens = _encodable(prompt_field), token_ids(prompt_field)
    elif isinstance(prompt_field, list) and all(_is_int(t) for t in prompt_field):
        tokens = list(prompt_field)
        bad = [t for t in tokens if not 0 <= t < VOCAB_SIZE]
        if bad:
            raise RequestError(f"Token id {bad[0]} is out of vocabulary")
        prompt = " ".join(map(str, tokens))
    elif isinstance(prompt_field, list):
        raise RequestError("vllm_sim does not support batched prompts; send one prompt per request")
    else:
        raise RequestError("prompt must be a string, a list of token ids, or a list of one of those")
    if not tokens:
        raise RequestError("The decoder prompt cannot be empty")
    return _generation("completion", body, prompt, tokens, _opt_int(body, "max_tokens"))


def parse_embedding(body: dict[str, Any]) -> EmbeddingRequest:
    raw = body.get("input")
    if raw is None:
        raise RequestError("Field required: input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_int(t) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise RequestError("input must be a string, a list of strings, or token ids")
    inputs: list[str] = []
    prompt_tokens = 0
    for item in raw:
        if isinstance(item, str):
            tokens: list[Any] = words(item)
            inputs.append(item)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            tokens = item
            inputs.append(" ".join(map(str, item)))
        else:
            raise RequestError("input must be a string, a list of strings, or token ids")
        if not tokens:
            raise RequestError("The decoder prompt cannot be empty")
        prompt_tokens += len(tokens)
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise RequestError("encoding_format must be 'float' or 'base64'")
    return EmbeddingRequest(_model(body), inputs, prompt_tokens, encoding)


def _generation(
    kind: Literal["chat", "completion"], body: dict[str, Any], prompt: str,
    tokens: list[int], max_tokens: int | None,
) -> GenerationRequest:
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}.")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object")
        if not stream:
            raise RequestError("Stream options can only be defined when `stream=True`.")
        include_usage = bool(options.get("include_usage"))
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n < 1):
        raise RequestError("n must be a positive integer")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RequestError(f"{name} must be a number")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("ignore_eos must be a boolean")
    return GenerationRequest(
        kind=kind,
        model=_model(body),
        prompt=prompt,
        prompt_tokens=tokens,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        ignore_eos=ignore_eos,
    )


def _model(body: dict[str, Any]) -> str | None:
    """vLLM treats `model` as optional and falls back to the first served model."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string")
    return model or None


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise RequestError(f"{name} must be an integer")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
