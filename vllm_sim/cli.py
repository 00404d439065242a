"""Command line: `python -m vllm_sim --port P --model NAME [options]`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from .config import SimConfig
from .faults import Faults
from .lifecycle import serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_sim",
        description="A simulated vLLM OpenAI-compatible server (no GPU): real HTTP, "
        "deterministic output, vLLM's timing, queueing, metrics, shutdown and faults.",
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
                       help="time to first token (base prefill time)")
    model.add_argument("--itl", type=float, default=0.01, metavar="SECONDS",
                       help="inter-token latency")
    model.add_argument("--max-tokens-default", type=int, default=16,
                       help="max_tokens when the request gives none")
    model.add_argument("--max-num-seqs", type=int, default=8,
                       help="running slots; further requests wait in a FIFO queue (never 429)")
    model.add_argument("--prefill-per-token", type=float, default=0.0, metavar="SECONDS",
                       help="extra prefill time per prompt token not found in the prefix cache")
    model.add_argument("--prefix-cache-blocks", type=int, default=1024,
                       help="KV/prefix cache capacity in 16-token blocks (LRU)")
    model.add_argument("--embedding-dim", type=int, default=16, help="length of embedding vectors")
    model.add_argument("--seed", type=int, default=0,
                       help="mixed into the hash that picks output words and vectors")
    model.add_argument("--legacy-metrics", action="store_true",
                       help="emit legacy names (vllm:gpu_cache_usage_perc, "
                       "vllm:gpu_prefix_cache_queries_total, ...) instead of current ones")

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
    if args.max_num_seqs < 1 or args.max_model_len < 1 or args.max_tokens_default < 1:
        parser.error("--max-num-seqs, --max-model-len and --max-tokens-default must be >= 1")
    if min(args.ttft, args.itl, args.prefill_per_token, args.startup_delay) < 0:
        parser.error("times must be >= 0")
    config = SimConfig(
        models=tuple(dict.fromkeys(args.models)),
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        ttft=args.ttft,
        itl=args.itl,
        max_tokens_default=args.max_tokens_default,
        max_num_seqs=args.max_num_seqs,
        prefill_per_token=args.prefill_per_token,
        prefix_cache_blocks=args.prefix_cache_blocks,
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
