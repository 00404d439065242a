"""The simulator's tokeniser: prompt text -> words -> integer token ids.

This is the one place that decides what a "token" is. The gateway reproduces it to
compute the same KV block hashes as the simulator, so the rule is fixed and simple:

1. A chat request is first rendered to text by `render_chat(messages)`: for every
   message in order, `<|ROLE|>` + "\\n" + its content text, the pieces joined by "\\n",
   then "\\n<|assistant|>". Content given as a list of parts keeps the text of
   `{"type": "text"}` parts and writes `<TYPE>` for any other part, joined by spaces.
2. The text is split on runs of whitespace (Python's `str.split()` with no argument).
3. Each word becomes `zlib.crc32(word.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF`.

A completion prompt given as a string goes through steps 2-3; a prompt given as token
ids is used as is. The end-of-sequence token (no text) has id 0, which is also what an
empty word would map to. Pure functions only: no I/O and no per-process state
(Python's `hash()` is salted per process, so it is never used here).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

# Ids are 31-bit so they fit every consumer's token type (u32, i32, i64).
TOKEN_ID_MASK = 0x7FFFFFFF
EOS_TOKEN_ID = 0
VOCAB_SIZE = TOKEN_ID_MASK + 1


def words(text: str) -> list[str]:
    """Whitespace split: one word per token."""
    return text.split()


def token_id(word: str) -> int:
    """The id of one word (stable across processes and machines)."""
    return zlib.crc32(word.encode("utf-8", "surrogatepass")) & TOKEN_ID_MASK


def token_ids(text: str) -> list[int]:
    """Ids of the words of `text`, in order."""
    crc32 = zlib.crc32
    return [crc32(w.encode("utf-8", "surrogatepass")) & TOKEN_ID_MASK for w in text.split()]


def content_text(content: Any) -> str:
    """Text of a message `content`: a string, None, or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if part.get("type") == "text":
            pieces.append(str(part.get("text", "")))
        else:
            pieces.append(f"<{part.get('type', 'part')}>")
    return " ".join(pieces)


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """Flatten chat messages into one prompt string, like a chat template would."""
    parts = []
    for message in messages:
        parts.append(f"<|{message.get('role', 'user')}|>\n{content_text(message.get('content'))}")
    parts.append("<|assistant|>")
    return "\n".join(parts)


def prompt_token_ids_for_chat(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids the simulator computes (and caches) for a chat request's prompt."""
    return token_ids(render_chat(messages))


def prompt_token_ids_for_completion(prompt: str | Sequence[int]) -> list[int]:
    """Token ids for a completion prompt: a string is tokenised, token ids pass through."""
    if isinstance(prompt, str):
        return token_ids(prompt)
    return list(prompt)


def output_token_id(piece: str) -> int:
    """Id of one generated token, given its text piece (" word", "word", or "" for EOS)."""
    return token_id(piece.strip()) if piece else EOS_TOKEN_ID
