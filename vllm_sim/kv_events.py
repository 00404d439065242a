"""KV cache events on vLLM's wire format: ZeroMQ PUB + ROUTER replay, msgpack payloads.

What goes over the wire (vllm/distributed/kv_events.py):

- PUB multipart message: `[topic, seq (8-byte big-endian), payload]`, one per engine
  step that produced events; `seq` counts from 0 in each process.
- payload: msgpack of the batch as a positional array `[ts, events, data_parallel_rank]`
  (`EventBatch` is `array_like`); each event is a map tagged by `"type"`
  (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`) with vLLM's field names, fields
  equal to their default omitted (`omit_defaults`).
- Replay: a ROUTER socket answers a request `[empty, start_seq (8 bytes)]` with every
  buffered batch whose seq >= start_seq as `[empty, topic, seq, payload]`, then the end
  marker `[empty, b"", seq=-1, b""]`.
- The PUB socket binds when the endpoint is a wildcard (`tcp://*:5557`, `::`, ipc://,
  inproc://) and connects otherwise; the replay socket always binds.

Everything runs on the event loop (PUB sends never block: ZeroMQ drops at the
high-water mark), so there is no publisher thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """vLLM's `--kv-events-config` (same fields, defaults and meaning)."""

    enable_kv_cache_events: bool = False
    publisher: Literal["null", "zmq"] | None = None  # None: "zmq" if enabled, else "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def active(self) -> bool:
        """Events are recorded and sent only when enabled with a real publisher."""
        return self.enable_kv_cache_events and self.resolved_publisher == "zmq"

    @property
    def resolved_publisher(self) -> str:
        if self.publisher is None:
            return "zmq" if self.enable_kv_cache_events else "null"
        return self.publisher


def parse_kv_events_config(raw: str) -> KVEventsConfig:
    """Parse the JSON object given to --kv-events-config; ValueError on bad input."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"--kv-events-config is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("--kv-events-config must be a JSON object")
    known = {f.name for f in fields(KVEventsConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--kv-events-config: unknown field(s) {unknown}; known: {sorted(known)}")
    config = KVEventsConfig(**data)
    if not isinstance(config.enable_kv_cache_events, bool):
        raise ValueError("--kv-events-config: enable_kv_cache_events must be a boolean")
    if config.publisher not in (None, "null", "zmq"):
        raise ValueError(f"--kv-events-config: unknown publisher {config.publisher!r}; "
                         "choose 'zmq' or 'null'")
    for name in ("buffer_steps", "hwm", "max_queue_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"--kv-events-config: {name} must be a non-negative integer")
    if not isinstance(config.endpoint, str) or not isinstance(config.topic, str):
        raise ValueError("--kv-events-config: endpoint and topic must be strings")
    if config.replay_endpoint is not None and not isinstance(config.replay_endpoint, str):
        raise ValueError("--kv-events-config: replay_endpoint must be a string or null")
    return config


def encode_batch(ts: float, events: Sequence[dict[str, Any]], data_parallel_rank: int = 0) -> bytes:
    """msgpack of a KVEventBatch: `[ts, [event maps...], data_parallel_rank]`."""
    import msgpack  # only needed when events are on; cached in sys.modules after the first call

    return msgpack.packb([ts, list(events), data_parallel_rank], use_bin_type=True)


def binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard / local endpoint, connect to anything else."""
    return ("*" in endpoint or "::" in endpoint or endpoint.startswith("ipc://")
            or endpoint.startswith("inproc://"))


class EventPublisher(Protocol):
    def publish(self, events: Sequence[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...

    @property
    def published(self) -> int: ...


class NullPublisher:
    """Publishing is off: events are not even recorded."""

    published = 0

    def publish(self, events: Sequence[dict[str, Any]]) -> None:
        return

    def close(self) -> None:
        return


class ZmqPublisher:
    """PUB socket + replay buffer + ROUTER replay socket, all on the event loop."""

    def __init__(self, config: KVEventsConfig) -> None:
        import zmq
        import zmq.asyncio

        self._zmq = zmq
        self.config = config
        self._topic = config.topic.encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: Any = None
        self._actx: Any = None
        self._replay_task: asyncio.Task[None] | None = None
        try:
            if binds(config.endpoint):
                self._pub.bind(config.endpoint)
            else:
                self._pub.connect(config.endpoint)
            if config.replay_endpoint is not None:
                self._actx = zmq.asyncio.Context()
                self._replay = self._actx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(config.replay_endpoint)
        except zmq.ZMQError:
            self.close()
            raise

    @property
    def published(self) -> int:
        """Batches sent so far (also the next sequence number)."""
        return self._seq

    def start(self) -> None:
        """Begin answering replay requests (needs a running event loop)."""
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: Sequence[dict[str, Any]]) -> None:
        if not events:
            return
        payload = encode_batch(time.time(), events)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload),
                                     flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            pass  # above the high-water mark ZeroMQ drops, as it does for vLLM

    async def _serve_replay(self) -> None:
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                continue  # vLLM logs and ignores malformed requests
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await sock.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"),
                                               payload))
            await sock.send_multipart((client, b"", b"", END_SEQ, b""))

    def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            self._replay_task = None
        for sock in (self._pub, self._replay):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        self._ctx.term()
        if self._actx is not None:
            self._actx.term()


def make_publisher(config: KVEventsConfig) -> NullPublisher | ZmqPublisher:
    return ZmqPublisher(config) if config.active else NullPublisher()
