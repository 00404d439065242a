"""Consume vLLM's KV cache events so the prefix index knows what each replica really holds.

Every ingress replica subscribes to every READY vLLM replica (ZeroMQ SUB to the
replica's event port), so all ingress replicas see the same facts without talking to
each other. The wire format is vLLM's (`vllm/distributed/kv_events.py`): multipart
`[topic, seq (8 bytes, big-endian), payload]`, the payload a msgpack `EventBatch`
array `[ts, events, data_parallel_rank]` of maps tagged by `type`: `BlockStored`
(`block_hashes`, `parent_block_hash`, `token_ids`, `block_size`, ...), `BlockRemoved`
(`block_hashes`), `AllBlocksCleared`.

The engine's block hashes are not recomputed here (their function depends on the vLLM
version and its hash seed); each stored block is keyed by the gateway's own chain over
its `token_ids` (`routers.prefix.token_blocks`), which is how requests are keyed too,
and the engine hash -> key mapping is remembered for `BlockRemoved`.

Sequence numbers keep it honest: a gap (or joining late) asks the replica's replay
socket for the missed batches; a sequence that goes backwards means the replica
restarted, so everything it held is forgotten first.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgpack
import zmq
import zmq.asyncio

from routers import PrefixIndex

from ..config import KVEvents

log = logging.getLogger("ray.serve")

END_SEQ = -1
REPLAY_TIMEOUT_S = 2.0
RECONNECT_S = 0.5
IDLE_CATCH_UP_S = 1.0  # a stream quiet this long asks the replay socket for what it missed
END_OF_TIME = 1 << 62


@dataclass(slots=True)
class StreamStatus:
    """What /admin/replicas shows about one replica's event stream."""

    endpoint: str
    batches: int = 0
    last_seq: int | None = None
    replays: int = 0
    replayed_batches: int = 0
    restarts_seen: int = 0
    unknown_parents: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "batches": self.batches,
            "last_seq": self.last_seq,
            "replays": self.replays,
            "replayed_batches": self.replayed_batches,
            "restarts_seen": self.restarts_seen,
            "unknown_parents": self.unknown_parents,
            "last_error": self.errors[-1] if self.errors else None,
        }


class BlockMap:
    """One replica's engine block hash -> gateway key, and what that means for the index."""

    def __init__(self, replica_id: str, index: PrefixIndex, block_size: int, max_entries: int) -> None:
        self._replica_id = replica_id
        self._index = index
        self._block_size = block_size
        self._max = max_entries
        self._keys: dict[Any, int] = {}
        self.unknown_parents = 0

    def apply(self, events: list[Any]) -> None:
        for event in events:
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                self._removed(event)
            elif kind == "AllBlocksCleared":
                self.clear()

    def clear(self) -> None:
        self._keys.clear()
        self._index.clear(self._replica_id)

    def _stored(self, event: dict[str, Any]) -> None:
        if event.get("medium") not in (None, "GPU"):
            return  # an offload tier: not what prefill reuses first
        hashes = event.get("block_hashes") or []
        tokens = event.get("token_ids") or []
        size = event.get("block_size") or self._block_size
        parent_hash = event.get("parent_block_hash")
        if size != self._block_size:
            return  # the requests are keyed in blocks of another size: nothing would match
        if parent_hash is None:
            parent = 0
        else:
            found = self._keys.get(parent_hash)
            if found is None:
                self.unknown_parents += 1  # missed its parent: the chain cannot be keyed
                return
            parent = found
        keys = []
        for i, engine_hash in enumerate(hashes):
            block = tokens[i * size : (i + 1) * size]
            if len(block) != size:
                break
            parent = hash((parent, *block))
            self._keys[engine_hash] = parent
            keys.append(parent)
        if keys:
            self._index.add(self._replica_id, keys, touch=False)
        while len(self._keys) > self._max:
            del self._keys[next(iter(self._keys))]

    def _removed(self, event: dict[str, Any]) -> None:
        if event.get("medium") not in (None, "GPU"):
            return
        keys = [k for h in event.get("block_hashes") or [] if (k := self._keys.pop(h, None)) is not None]
        if keys:
            self._index.remove(self._replica_id, keys)


class ReplicaEvents:
    """One replica's event stream: subscribe, apply in order, replay gaps, notice restarts."""

    def __init__(self, replica_id: str, url: str, config: KVEvents, index: PrefixIndex, ctx: zmq.asyncio.Context,
                 max_entries: int) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = config.port if config.port_offset is None else (parts.port or 80) + config.port_offset
        self.endpoint = f"tcp://{host}:{port}"
        self.replay_endpoint = f"tcp://{host}:{port + 1}" if config.replay else None
        self._topic = config.topic.encode()
        self._ctx = ctx
        self.blocks = BlockMap(replica_id, index, config.block_size, max_entries)
        self.status = StreamStatus(self.endpoint)
        self._next: int | None = None  # the sequence number expected next

    async def run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        sub.connect(self.endpoint)  # ZeroMQ reconnects by itself when the replica restarts
        try:
            while True:
                try:
                    frames = await asyncio.wait_for(sub.recv_multipart(), IDLE_CATCH_UP_S)
                except TimeoutError:
                    # Quiet for a while: batches sent while the subscription was (re)joining
                    # are only noticed at the next batch, so ask the replay socket now.
                    await self.replay(self._next or 0, END_OF_TIME)
                    continue
                if len(frames) != 3:
                    continue
                await self.receive(int.from_bytes(frames[1], "big", signed=True), frames[2])
        finally:
            sub.close(linger=0)

    async def receive(self, seq: int, payload: bytes) -> None:
        expected = self._next
        if expected is not None and seq < expected:
            # Sequence numbers start at 0 in each engine process: the replica restarted
            # and its cache is empty now, whatever we knew of the old one.
            self.status.restarts_seen += 1
            self.blocks.clear()
            expected = self._next = 0  # the old process's numbering means nothing now
        if (expected is None and seq > 0) or (expected is not None and seq > expected):
            await self.replay(expected or 0, seq)
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            events = batch[1] if isinstance(batch, (list, tuple)) else batch.get("events", [])
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the stream
            self._error(f"undecodable batch {seq}: {type(exc).__name__}")
            return
        self.blocks.apply(events)
        self.status.batches += 1
        self.status.last_seq = seq
        self.status.unknown_parents = self.blocks.unknown_parents
        self._next = seq + 1

    async def replay(self, start: int, until: int) -> None:
        """Ask the replay socket for batches [start, until); what it no longer has stays missed."""
        if self.replay_endpoint is None:
            return
        got = False
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # The replay socket (a ROUTER) sends its whole buffer at once and silently drops
        # what does not fit in the pipe to us: no receive limit here, so a replay of
        # thousands of batches arrives whole, end marker included.
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.connect(self.replay_endpoint)
        try:
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), REPLAY_TIMEOUT_S)
                if len(frames) == 4:  # [empty, topic, seq, payload]; vLLM 0.32 sends the topic
                    _, _, seq_bytes, payload = frames
                elif len(frames) == 3:  # [empty, seq, payload] (older vLLM)
                    _, seq_bytes, payload = frames
                else:
                    continue
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq == END_SEQ:
                    return
                if start <= seq < until and (self._next is None or seq >= self._next):
                    if not got:
                        self.status.replays += 1
                        got = True
                    self._apply(seq, payload)
                    self.status.replayed_batches += 1
        except TimeoutError:
            self._error(f"replay from {start} timed out")
        finally:
            dealer.close(linger=0)

    def _error(self, message: str) -> None:
        log.warning("KV events from %s: %s", self.endpoint, message)
        self.status.errors = [*self.status.errors[-4:], message]


class KVEventConsumer:
    """Keeps one `ReplicaEvents` task per READY replica of the current view."""

    def __init__(self, config: KVEvents, index: PrefixIndex) -> None:
        self._config = config
        self._index = index
        self._ctx = zmq.asyncio.Context()
        self._streams: dict[str, tuple[str, ReplicaEvents, asyncio.Task[None]]] = {}

    def sync(self, replicas: list[tuple[str, str]]) -> None:
        """Follow exactly these (replica_id, url): start new streams, stop departed ones."""
        wanted = dict(replicas)
        for replica_id in [rid for rid in self._streams if wanted.get(rid) != self._streams[rid][0]]:
            _, _, task = self._streams.pop(replica_id)
            task.cancel()
        per_replica = max(1024, 2 * self._index.max_blocks // max(1, len(wanted)))
        for replica_id, url in wanted.items():
            if replica_id in self._streams:
                continue
            stream = ReplicaEvents(replica_id, url, self._config, self._index, self._ctx, per_replica)
            task = asyncio.get_running_loop().create_task(self._run(stream), name=f"kv-events {replica_id}")
            self._streams[replica_id] = (url, stream, task)

    async def _run(self, stream: ReplicaEvents) -> None:
        while True:
            try:
                await stream.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep following the replica
                stream._error(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(RECONNECT_S)

    def status(self, replica_id: str) -> dict[str, Any] | None:
        found = self._streams.get(replica_id)
        return found[1].status.as_dict() if found else None

    def close(self) -> None:
        for _, _, task in self._streams.values():
            task.cancel()
        self._streams.clear()
        self._ctx.destroy(linger=0)
