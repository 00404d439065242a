"""Read a replica's load from vLLM's Prometheus text: running, waiting, KV-cache usage and size.

A line scan rather than a full parser: the health actor scrapes every replica several
times a second, and only a few series matter. Both current and legacy vLLM names count.
The cache size comes from `vllm:cache_config_info`'s `num_gpu_blocks` and `block_size` labels.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
CACHE_CONFIG = "vllm:cache_config_info"


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    cache_tokens: int | None = None  # KV cache size: num_gpu_blocks x block_size


def _value(line: str) -> float:
    # `name{labels} value [timestamp]`; label values may hold spaces, so split after '}'.
    rest = line[line.rfind("}") + 1 :] if "}" in line else line.split(None, 1)[1]
    return float(rest.split()[0])


def parse_load(text: str) -> ReplicaLoad:
    running = waiting = 0.0
    kv: list[float] = []
    cache_tokens: int | None = None
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
            elif name == CACHE_CONFIG and cache_tokens is None:
                cache_tokens = _cache_tokens(line)
        except (IndexError, ValueError):
            continue  # a malformed line must not hide the rest
    return ReplicaLoad(int(running), int(waiting), max(kv) if kv else 0.0, cache_tokens)


def _label(line: str, name: str) -> str | None:
    start = line.find(f'{name}="')
    if start < 0 or (start > 0 and line[start - 1] not in "{,"):
        return None
    start += len(name) + 2
    end = line.find('"', start)
    return line[start:end] if end > 0 else None


def _cache_tokens(line: str) -> int | None:
    blocks, size = _label(line, "num_gpu_blocks"), _label(line, "block_size")
    if blocks is None or size is None or not blocks.isdigit() or not size.isdigit():
        return None
    return int(blocks) * int(size) or None
