"""KV block hashes: a chain of sha256 digests over whole blocks of token ids.

Like vLLM, a block's hash covers its own tokens and its parent's hash, so equal hashes
mean equal prefixes. The rule is fixed so any process (another simulator, the gateway)
computes the same values:

    ROOT        = sha256(b"vllm-none-hash")
    digest(i)   = sha256(digest(i-1) + little-endian uint32 of each of the block's ids)
                  with digest(-1) = ROOT
    hash(i)     = int.from_bytes(digest(i), "big") & (2**64 - 1)

`hash(i)` (the low 64 bits, as vLLM's int block hashes) is what the cache is keyed by
and what KV events carry. Only whole blocks are hashed; a trailing partial block is not.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_DIGEST = hashlib.sha256(b"vllm-none-hash").digest()
_MASK64 = (1 << 64) - 1


def block_digest(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """sha256 over the parent digest and one block's token ids (uint32 little-endian)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()


def external_hash(digest: bytes) -> int:
    """The 64-bit int form of a digest: vLLM's `maybe_convert_block_hash`."""
    return int.from_bytes(digest, "big") & _MASK64


def chain_digests(
    token_ids: Sequence[int], block_size: int, parent: bytes = ROOT_DIGEST, start: int = 0
) -> list[bytes]:
    """Digests of the whole blocks of `token_ids[start:]`, chained from `parent`."""
    sha256, pack = hashlib.sha256, struct.Struct(f"<{block_size}I").pack
    out: list[bytes] = []
    for begin in range(start, len(token_ids) - block_size + 1, block_size):
        parent = sha256(parent + pack(*token_ids[begin : begin + block_size])).digest()
        out.append(parent)
    return out


def block_hashes(token_ids: Sequence[int], block_size: int = 16) -> list[int]:
    """The int hashes of every whole block of a prompt (what BlockStored events carry)."""
    return [external_hash(d) for d in chain_digests(token_ids, block_size)]
