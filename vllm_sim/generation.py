"""Deterministic "model output": text and embeddings as pure functions of the request.

Tests (and the gateway's tests) import these functions to predict exactly what the
simulator answers, so keep them free of I/O and of process state.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

from .tokenizer import content_text, render_chat, words

# Kept under its old name: tests count prompt tokens with it. The chat helpers moved to
# tokenizer.py and are re-exported here for existing imports.
tokenize = words
__all__ = ["Generation", "content_text", "embed", "generate", "natural_length", "render_chat",
           "tokenize"]

_VOCAB = (
    "the of and to in is was for on that with as by at from it an be this are "
    "or which has had not but have were one their all its also can more than "
    "new other some time into only two first may such after most over these many "
    "where between both through when under each while about would could there "
    "just"
).split()
assert len(_VOCAB) == 64  # the generator picks a word with 6 random bits

_MASK64 = (1 << 64) - 1
# Below this natural length a reply would be too short to be useful in tests.
_MIN_NATURAL_LEN = 16
_NATURAL_LEN_SPAN = 240


@dataclass(frozen=True, slots=True)
class Generation:
    """The planned output of one request: one string per output token."""

    tokens: tuple[str, ...]
    finish_reason: str  # "length" or "stop"

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def _seed_of(*parts: str) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def natural_length(model: str, prompt: str, seed: int = 0) -> int:
    """How many text tokens the "model" wants to write before its end-of-sequence token."""
    return _MIN_NATURAL_LEN + _seed_of(str(seed), model, prompt, "len") % _NATURAL_LEN_SPAN


def generate(
    model: str, prompt: str, max_tokens: int, *, ignore_eos: bool = False, seed: int = 0
) -> Generation:
    """Plan the output for (model, prompt, max_tokens).

    The model writes `natural_length` words and then an end-of-sequence token, which,
    as in vLLM, counts as a completion token but adds no text. Output for a smaller
    max_tokens is a prefix of the output for a larger one, as with greedy decoding.
    """
    natural = max_tokens if ignore_eos else natural_length(model, prompt, seed)
    count = min(max_tokens, natural)
    state = _seed_of(str(seed), model, prompt)
    tokens: list[str] = []
    append = tokens.append
    for i in range(count):
        state = (state * 6364136223846793005 + 1442695040888963407) & _MASK64
        word = _VOCAB[state >> 58]
        append(word if i == 0 else " " + word)
    if max_tokens > natural:
        append("")  # the EOS token: counted, but detokenizes to nothing
        return Generation(tuple(tokens), "stop")
    return Generation(tuple(tokens), "length")


def embed(model: str, text: str, dim: int, seed: int = 0) -> list[float]:
    """A unit-length vector derived from a hash of the input."""
    values: list[float] = []
    counter = 0
    while len(values) < dim:
        digest = hashlib.blake2b(
            f"{seed}\x00{model}\x00{counter}\x00{text}".encode(), digest_size=64
        ).digest()
        values.extend(v / 2147483648.0 - 1.0 for v in struct.unpack("<16I", digest))
        counter += 1
    del values[dim:]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round-trip through float32 so the float and base64 encodings agree exactly.
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *(v / norm for v in values))))
