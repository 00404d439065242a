"""Precise prefix routing against real vLLM (CPU build, block size 128).

The gateway keys each request with the model's own tokenizer files
(`routing.tokenizer.kind: huggingface`, the directory real vLLM loads) and feeds its
prefix index from real vLLM's KV events. The proof that both sides agree: after a request,
the replica that served it holds exactly the request's blocks in the gateway's index. Its
own placement and the engine's `BlockStored` events name the same keys; a different
tokenisation would add a second, different set of blocks (or none at all).
"""

from __future__ import annotations

import hashlib
import random

import pytest

from serve_app.ingress.tokenizer import HuggingFaceTokenizer
from tests import real_vllm
from tests.real_vllm_model import WORDS
from tests.support import wait_until

pytestmark = pytest.mark.timeout(1500)

MODEL = real_vllm.MODEL
EXACT = {"extra_body": {"ignore_eos": True, "temperature": 0.0}}


@pytest.fixture(scope="session")
def vllm_fleet(request: pytest.FixtureRequest) -> real_vllm.Fleet:
    return real_vllm.fleet(request)


def shown(replica_id: str) -> set[str]:
    """What x-gateway-replica may say for a replica: its id, or the opaque name that hides it."""
    return {replica_id, "replica-" + hashlib.sha256(replica_id.encode()).hexdigest()[:12]}


def row_of(table: dict, served: str) -> dict:
    rows = [r for r in table["replicas"] if served in shown(r["replica_id"])]
    assert len(rows) == 1, (served, table["replicas"])
    return rows[0]


def test_real_vllm_events_name_the_blocks_the_gateway_computed(vllm_fleet: real_vllm.Fleet, gateway) -> None:
    servers = vllm_fleet.servers(2)
    gw = gateway(
        [s.url for s in servers], router="cache_aware",
        routing={
            "kv_events": {"enabled": True, "port_offset": real_vllm.KV_OFFSET, "replay": True,
                          "block_size": real_vllm.BLOCK_SIZE},
            "tokenizer": {"kind": "huggingface", "path": str(vllm_fleet.model_dir)},
        },
    )
    gw.wait_states({s.url: "READY" for s in servers}, timeout=60)
    assert gw.table()["routing"]["prefix_index"].startswith("precise")

    rng = random.Random(7)
    system = " ".join(rng.choice(WORDS) for _ in range(420))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "tell me a story"}]
    ids = HuggingFaceTokenizer(str(vllm_fleet.model_dir)).chat(messages)
    blocks = len(ids) // real_vllm.BLOCK_SIZE
    assert blocks >= 3

    sdk = gw.sdk(timeout=120)
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=2, **EXACT)
    reply = raw.parse()
    assert reply.usage.prompt_tokens == len(ids)  # vLLM tokenised the chat exactly as the gateway did
    served = raw.headers["x-gateway-replica"]

    def events_arrived() -> bool:
        status = row_of(gw.table(), served).get("kv_events") or {}
        return (status.get("batches") or 0) >= 1

    wait_until(events_arrived, 30, "the serving replica's KV events")
    row = row_of(gw.table(), served)
    assert row["kv_events"]["unknown_parents"] == 0 and row["kv_events"]["last_error"] is None
    assert row["prefix_index_blocks"] == blocks  # placement and events: the same keys

    # The same prefix again lands on the same replica, and real vLLM finds it cached.
    again = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=[messages[0], {"role": "user", "content": "say hello world"}], max_tokens=2, **EXACT)
    assert again.headers["x-gateway-replica"] == served
