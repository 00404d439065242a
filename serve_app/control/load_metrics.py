"""Read a replica's load from vLLM's Prometheus text: running, waiting, KV-cache usage.

A line scan rather than a full parser: the health actor scrapes every replica every
few seconds, and only three gauges matter. Both current and legacy vLLM names count.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


def _value(line: str) -> float:
    # `name{labels} value [timestamp]`; label values may hold spaces, so split after '}'.
    rest = line[line.rfind("}") + 1 :] if "}" in line else line.split(None, 1)[1]
    return float(rest.split()[0])


def parse_load(text: str) -> ReplicaLoad:
    running = waiting = 0.0
    kv: list[float] = []
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(None, 1)[0]
        try:
            if name == RUNNING:
                running += _value(line)
            elif name == WAITING:
                waiting += _value(line)
            elif name in KV_USAGE:
                kv.append(_value(line))
        except (IndexError, ValueError):
            continue  # a malformed line must not hide the rest
    return ReplicaLoad(int(running), int(waiting), max(kv) if kv else 0.0)
