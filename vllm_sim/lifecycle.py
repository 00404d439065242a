"""Process lifecycle: load delay (port closed), serve, and SIGTERM abort or drain.

SIGTERM follows --shutdown-mode; SIGINT, or a second signal while draining, always
aborts so Ctrl-C never waits.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web

from .config import LOADING_PREFIX, READY_PREFIX, SimConfig
from .faults import Faults
from .server import SimServer


def log(message: str) -> None:
    """One line to stdout, flushed at once: the parent process may be waiting for it."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


class _Signals:
    """Turns SIGTERM/SIGINT into events the main coroutine can wait on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.received: list[int] = []
        self.event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self.received.append(sig)
        self.event.set()

    def rearm(self) -> None:
        self.event.clear()

    @property
    def abort_requested(self) -> bool:
        """SIGINT, or more than one signal, means: stop now."""
        return signal.SIGINT in self.received or len(self.received) > 1


async def _wait(event: asyncio.Event, timeout: float | None) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def serve(config: SimConfig, faults: Faults) -> int:
    """Run one simulator until a signal stops it; returns the exit status."""
    loop = asyncio.get_running_loop()
    signals = _Signals(loop)
    models = ", ".join(config.models)
    log(f"{LOADING_PREFIX} {models} (startup delay {config.startup_delay:g}s)")
    # The socket is not bound until the "model is loaded": connections are refused.
    if config.startup_delay > 0 and await _wait(signals.event, config.startup_delay):
        log("vllm_sim stopped before it finished loading")
        return 0

    try:
        sim = SimServer(config, faults)
    except Exception as exc:  # e.g. the KV events endpoint is taken (zmq.ZMQError)
        log(f"vllm_sim cannot publish KV events on {config.kv_events.endpoint}: {exc}")
        return 2
    runner = web.AppRunner(
        sim.build_app(),
        handler_cancellation=True,  # a client disconnect cancels its handler: frees the slot
        access_log=None,
        keepalive_timeout=config.keepalive_timeout,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        log(f"vllm_sim cannot listen on {config.host}:{config.port}: {exc}")
        await runner.cleanup()
        sim.close()
        return 2
    sim.start()
    host, port = runner.addresses[0][:2]
    log(f"{READY_PREFIX}{_url_host(host)}:{port}")

    await signals.event.wait()
    if config.shutdown_mode == "drain" and not signals.abort_requested:
        signals.rearm()
        sim.draining = True
        log(f"vllm_sim draining: {sim.inflight} in flight, up to {config.drain_timeout:g}s")
        idle = loop.create_task(sim.idle.wait())
        stop = loop.create_task(signals.event.wait())
        await asyncio.wait({idle, stop}, timeout=config.drain_timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        stop.cancel()
    await site.stop()  # stop accepting first, then cut whatever is left
    cut = sim.abort_inflight()
    await runner.cleanup()
    sim.close()
    log(f"vllm_sim stopped ({cut} in-flight requests cut)")
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
