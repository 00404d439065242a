"""Settings of one simulator process, shared by the CLI, the engine and the routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .engine import EngineConfig
from .kv_events import KVEventsConfig

ShutdownMode = Literal["abort", "drain"]

# The line printed once the port accepts connections (testing.py waits for it).
READY_PREFIX = "vllm_sim listening on http://"
LOADING_PREFIX = "vllm_sim loading"

# vLLM's default KV-cache block size on GPUs (its CPU backend uses 128).
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything fixed at start-up (runtime-changeable knobs live in `faults.Faults`)."""

    models: tuple[str, ...] = ("sim-model",)
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int = 4096
    ttft: float = 0.05
    itl: float = 0.01
    max_tokens_default: int = 16
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    prefill_per_token: float = 0.0
    decode_per_seq: float = 0.0
    num_gpu_blocks: int = 1024
    block_size: int = BLOCK_SIZE
    enable_prefix_caching: bool = True
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    startup_delay: float = 0.0
    shutdown_mode: ShutdownMode = "abort"
    drain_timeout: float = 30.0
    legacy_metrics: bool = False
    seed: int = 0
    embedding_dim: int = 16
    # uvicorn (which vLLM runs on) closes idle keep-alive connections after 5 s.
    keepalive_timeout: float = 5.0
    record_capacity: int = 256

    @property
    def prefix_cache_blocks(self) -> int:
        """The old name of --num-gpu-blocks."""
        return self.num_gpu_blocks

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            ttft=self.ttft,
            itl=self.itl,
            prefill_per_token=self.prefill_per_token,
            decode_per_seq=self.decode_per_seq,
            num_gpu_blocks=self.num_gpu_blocks,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
        )

    @property
    def served_model(self) -> str:
        """vLLM labels its metrics with the first served model name."""
        return self.models[0]
