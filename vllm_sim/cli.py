"""Command line: `python -m vllm_sim --port P --model NAME [options]`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from .config import SimConfig
from .faults import Faults
from .kv_events import KVEventsConfig, parse_kv_events_config
from .lifecycle import serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_sim",
        description="A simulated vLLM OpenAI-compatible server (no GPU): real HTTP, "
        "deterministic output, a step-based scheduler over a KV block cache with prefix "
        "caching, vLLM's metrics and KV cache events, shutdown modes and faults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind")
    server.add_argument("--port", type=int, required=True,
                        help="port to bind (0 picks a free one; see the 'listening on' line)")
    server.add_argument("--model", dest="models", action="append", required=True, metavar="NAME",
                        help="served model name; repeat to serve several (metrics use the first)")
    server.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS",
                        help="time to 'load the model'; the port refuses connections until then")
    server.add_argument("--shutdown-mode", choices=("abort", "drain"), default="abort",
                        help="on SIGTERM: abort = reset in-flight requests and exit; drain = "
                        "keep listening, finish in-flight requests, answer new ones 503, exit "
                        "when idle or after --drain-timeout (SIGINT always aborts)")
    server.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="longest a drain waits for in-flight requests")
    server.add_argument("--keepalive-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="idle keep-alive connections are closed after this (uvicorn: 5)")

    model = p.add_argument_group("model and engine")
    model.add_argument("--max-model-len", type=int, default=4096, help="context length in tokens")
    model.add_argument("--ttft", type=float, default=0.05, metavar="SECONDS",
                       help="per-request latency before a request reaches the engine queue "
                       "(tokenisation, API server); a lone request's TTFT is this plus its "
                       "uncached prompt tokens x --prefill-per-token")
    model.add_argument("--itl", type=float, default=0.01, metavar="SECONDS",
                       help="time of a decode step with one running sequence (inter-token latency)")
    model.add_argument("--decode-per-seq", type=float, default=0.0, metavar="SECONDS",
                       help="extra step time per additional decoding sequence, so bigger "
                       "batches decode slower (0 = batch size does not matter)")
    model.add_argument("--prefill-per-token", type=float, default=0.0, metavar="SECONDS",
                       help="step time per prompt token computed (tokens found in the prefix "
                       "cache cost nothing)")
    model.add_argument("--max-tokens-default", type=int, default=16,
                       help="max_tokens when the request gives none")
    model.add_argument("--max-num-seqs", type=int, default=8,
                       help="running slots; further requests wait in a FIFO queue (never 429)")
    model.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="token budget of one engine step (decodes first, then prefill "
                       "chunks); raised to --max-num-seqs if smaller")
    model.add_argument("--embedding-dim", type=int, default=16, help="length of embedding vectors")
    model.add_argument("--seed", type=int, default=0,
                       help="mixed into the hash that picks output words and vectors")
    model.add_argument("--legacy-metrics", action="store_true",
                       help="emit legacy names (vllm:gpu_cache_usage_perc, "
                       "vllm:gpu_prefix_cache_queries_total, ...) instead of current ones")

    cache = p.add_argument_group("KV cache and events")
    cache.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", "--prefix-cache-blocks",
                       dest="num_gpu_blocks", type=int, default=1024, metavar="N",
                       help="KV cache size in blocks; must hold --max-model-len tokens "
                       "(--prefix-cache-blocks is the old name)")
    cache.add_argument("--block-size", type=int, default=16,
                       help="tokens per KV block (16 as on GPUs; vLLM on CPU uses 128)")
    cache.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True, help="reuse cached blocks of earlier requests")
    cache.add_argument("--kv-events-config", metavar="JSON",
                       help="vLLM's KVEventsConfig, e.g. '{\"enable_kv_cache_events\": true, "
                       "\"endpoint\": \"tcp://*:5557\", \"replay_endpoint\": \"tcp://*:5558\"}' "
                       "(fields: enable_kv_cache_events, publisher zmq|null, endpoint, "
                       "replay_endpoint, buffer_steps, hwm, max_queue_size, topic)")

    faults = p.add_argument_group("faults (also settable at runtime: POST /sim/faults)")
    faults.add_argument("--die-mid-stream-after", type=int, metavar="N",
                        help="reset the TCP connection after N content chunks (no [DONE])")
    faults.add_argument("--kill-process-mid-stream-after", type=int, metavar="N",
                        help="exit the process (os._exit(1)) after N content chunks")
    faults.add_argument("--error-mid-stream-after", type=int, metavar="N",
                        help="send a data: {\"error\": ...} event and [DONE] after N content chunks")
    faults.add_argument("--hang", action="store_true", help="never answer /v1/* requests")
    faults.add_argument("--error-status", type=int, metavar="STATUS",
                        help="answer /v1/* with this HTTP status and vLLM's error body")
    faults.add_argument("--unhealthy", action="store_true",
                        help="dead engine: /health answers 503, /v1/* answer 500")
    faults.add_argument("--metrics-delay", type=float, metavar="SECONDS",
                        help="delay before /metrics answers")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[SimConfig, Faults]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.max_num_seqs, args.max_model_len, args.max_tokens_default,
           args.max_num_batched_tokens, args.num_gpu_blocks, args.block_size) < 1:
        parser.error("--max-num-seqs, --max-model-len, --max-tokens-default, "
                     "--max-num-batched-tokens, --num-gpu-blocks and --block-size must be >= 1")
    if min(args.ttft, args.itl, args.prefill_per_token, args.decode_per_seq,
           args.startup_delay) < 0:
        parser.error("times must be >= 0")
    if args.num_gpu_blocks * args.block_size < args.max_model_len:
        # vLLM refuses to start when one request of max_model_len cannot fit.
        parser.error(
            f"the KV cache ({args.num_gpu_blocks} blocks x {args.block_size} tokens = "
            f"{args.num_gpu_blocks * args.block_size} tokens) cannot hold one request of "
            f"--max-model-len {args.max_model_len}; raise --num-gpu-blocks or lower "
            "--max-model-len")
    kv_events = KVEventsConfig()
    if args.kv_events_config is not None:
        try:
            kv_events = parse_kv_events_config(args.kv_events_config)
        except ValueError as exc:
            parser.error(str(exc))
    config = SimConfig(
        models=tuple(dict.fromkeys(args.models)),
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        ttft=args.ttft,
        itl=args.itl,
        max_tokens_default=args.max_tokens_default,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_per_token=args.prefill_per_token,
        decode_per_seq=args.decode_per_seq,
        num_gpu_blocks=args.num_gpu_blocks,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_events=kv_events,
        startup_delay=args.startup_delay,
        shutdown_mode=args.shutdown_mode,
        drain_timeout=args.drain_timeout,
        legacy_metrics=args.legacy_metrics,
        seed=args.seed,
        embedding_dim=args.embedding_dim,
        keepalive_timeout=args.keepalive_timeout,
    )
    faults = Faults()
    patch = {
        "die_mid_stream_after": args.die_mid_stream_after,
        "kill_process_mid_stream_after": args.kill_process_mid_stream_after,
        "error_mid_stream_after": args.error_mid_stream_after,
        "hang": args.hang,
        "error_status": args.error_status,
        "unhealthy": args.unhealthy,
        "metrics_delay": args.metrics_delay,
    }
    try:
        faults.update(patch)
    except ValueError as exc:
        parser.error(str(exc))
    return config, faults


def main(argv: Sequence[str] | None = None) -> int:
    config, faults = parse_args(argv)
    return asyncio.run(serve(config, faults))
