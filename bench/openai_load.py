"""Sustained OpenAI-SDK load that accounts for every request (used by churn tests and bench).

Each request ends in exactly one Outcome:
- ok: a full answer (a stream counts only if it reached its finish_reason);
- failed: an error before the first byte of the answer reached the client;
- cut: a stream that started and then ended with an error event;
- cut_silently: a stream that ended without error event and without finish_reason.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import openai


@dataclass(slots=True)
class Outcome:
    kind: str
    stream: bool
    replica: str | None
    latency_s: float
    started_at: float
    error: str = ""


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    started: int = 0

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)

    def p99_latency_s(self) -> float:
        latencies = sorted(o.latency_s for o in self.outcomes if o.kind == "ok")
        return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")

    def summary(self) -> str:
        return (
            f"requests={self.started} ok={self.count('ok')} failed={self.count('failed')} "
            f"cut={self.count('cut')} cut_silently={self.count('cut_silently')} p99={self.p99_latency_s() * 1000:.0f}ms"
        )


async def _one(client: openai.AsyncOpenAI, model: str, stream: bool, max_tokens: int) -> Outcome:
    began = time.monotonic()
    replica = None
    messages = [{"role": "user", "content": f"churn {began}"}]
    got_first = False
    try:
        if stream:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=max_tokens, stream=True
            )
            replica = raw.headers.get("x-gateway-replica")
            finished = False
            async for chunk in raw.parse():
                got_first = True
                if chunk.choices and chunk.choices[0].finish_reason:
                    finished = True
            kind = "ok" if finished else "cut_silently"
            return Outcome(kind, True, replica, time.monotonic() - began, began)
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=max_tokens
        )
        replica = raw.headers.get("x-gateway-replica")
        reply = raw.parse()
        kind = "ok" if reply.choices and reply.choices[0].message.content else "failed"
        return Outcome(kind, False, replica, time.monotonic() - began, began)
    except Exception as exc:  # noqa: BLE001 - every failure is an outcome, never lost
        kind = "cut" if got_first else "failed"
        return Outcome(kind, stream, replica, time.monotonic() - began, began, f"{type(exc).__name__}: {exc}"[:300])


async def run_load(
    base_url: str,
    model: str,
    *,
    duration_s: float,
    concurrency: int = 16,
    max_tokens: int = 16,
    stop: asyncio.Event | None = None,
) -> LoadReport:
    """Run `concurrency` clients (half streaming) until `duration_s` passes or `stop` is set."""
    report = LoadReport()
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    deadline = time.monotonic() + duration_s

    async def worker(index: int) -> None:
        n = 0
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            report.started += 1
            report.outcomes.append(await _one(client, model, (index + n) % 2 == 0, max_tokens))
            n += 1

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await client.close()
    return report
