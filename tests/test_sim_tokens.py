"""The simulator's tokeniser and block hashes: fixed rules other processes reproduce.

The literal values below pin the rules: if one changes, the gateway's copy of the rule
breaks too, so a change must be deliberate (and documented in vllm_sim/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

from vllm_sim.generation import render_chat as render_chat_from_generation
from vllm_sim.generation import tokenize
from vllm_sim.hashing import ROOT_DIGEST, block_hashes, chain_digests, external_hash
from vllm_sim.tokenizer import (
    EOS_TOKEN_ID,
    output_token_id,
    prompt_token_ids_for_chat,
    prompt_token_ids_for_completion,
    render_chat,
    token_id,
)

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hi there"}, {"type": "image_url"}]},
]


def test_word_ids_are_crc32_masked_to_31_bits() -> None:
    assert token_id("hello") == 907060870 == zlib.crc32(b"hello") & 0x7FFFFFFF
    assert token_id("<|user|>") == 1618195767
    assert token_id("é") == zlib.crc32("é".encode()) & 0x7FFFFFFF
    assert EOS_TOKEN_ID == token_id("") == 0
    assert output_token_id(" hello") == output_token_id("hello") == 907060870
    assert output_token_id("") == EOS_TOKEN_ID


def test_chat_rule_renders_roles_in_order_then_splits_on_whitespace() -> None:
    text = render_chat(MESSAGES)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi there <image_url>\n<|assistant|>"
    assert render_chat_from_generation is render_chat  # one rule, re-exported
    ids = prompt_token_ids_for_chat(MESSAGES)
    assert ids == [1392866553, 1045342895, 279956721, 1618195767, 1293356558, 1513089430,
                   2059329619, 449994161]
    assert ids == [token_id(w) for w in text.split()]
    assert len(ids) == len(tokenize(text))  # what usage.prompt_tokens counts


def test_completion_prompt_ids() -> None:
    assert prompt_token_ids_for_completion("  a\tb\n c ") == [token_id(w) for w in "abc"]
    assert prompt_token_ids_for_completion([5, 6, 7]) == [5, 6, 7]


def test_block_hashes_chain_whole_blocks_only() -> None:
    ids = list(range(40))  # two whole blocks of 16, then 8 left over
    hashes = block_hashes(ids, 16)
    assert hashes == [7117768660782132432, 17505827325668245713]
    digests = chain_digests(ids, 16)
    assert [external_hash(d) for d in digests] == hashes
    assert external_hash(digests[0]) == int.from_bytes(digests[0][-8:], "big")
    # A parent's change moves every later hash; a later change leaves earlier ones.
    changed_first = block_hashes([99] + ids[1:], 16)
    changed_second = block_hashes(ids[:20] + [99] + ids[21:], 16)
    assert changed_first[0] != hashes[0] and changed_first[1] != hashes[1]
    assert changed_second[0] == hashes[0] and changed_second[1] != hashes[1]
    # Chaining from a digest continues the same chain.
    assert chain_digests(ids[16:32], 16, digests[0]) == digests[1:]
    assert chain_digests(ids[:15], 16) == [] and chain_digests(ids, 16, ROOT_DIGEST) == digests


def test_ids_and_hashes_do_not_depend_on_the_process() -> None:
    """Python's hash() is salted per process; nothing here may use it."""
    code = (
        "import json; from vllm_sim.tokenizer import prompt_token_ids_for_chat as c; "
        "from vllm_sim.hashing import block_hashes as b; "
        f"ids = c({MESSAGES!r}) * 5; print(json.dumps([ids, b(ids, 16)]))"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True, timeout=60).stdout
        outputs.add(out)
    assert len(outputs) == 1
    ids, hashes = json.loads(outputs.pop())
    assert ids == prompt_token_ids_for_chat(MESSAGES) * 5
    assert hashes == block_hashes(ids, 16) and len(hashes) == 2
