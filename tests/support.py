"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}" + (f" (last error: {last_error!r})" if last_error else ""))


def wait_for_event(event: threading.Event, worker: Future, timeout: float, message: str) -> None:
    """Wait until a worker thread sets `event`; if the worker ends first, raise what it raised."""
    wait_until(lambda: event.is_set() or worker.done(), timeout, message)
    if not event.is_set():
        worker.result()  # raises the worker's own failure, if it had one
        raise AssertionError(f"the worker returned without {message}")


def finish_startup(sim: Any, timeout: float = 30) -> None:
    """Bring up now a simulator started with a long `--startup-delay`, on the same port.

    Such a simulator refuses connections (its replica is PENDING) for as long as the
    test needs; the test then decides when the "model has loaded": the loading process
    is stopped and the same simulator starts again without the delay.
    """
    args = list(sim.args)
    i = args.index("--startup-delay")
    del args[i : i + 2]
    sim.restart(args, timeout=timeout)


class SustainedLoad:
    """bench's OpenAI-SDK load (`run_load`) in its own thread and event loop until `stop()`.

    Unlike `bench.churn.BackgroundLoad` it has no fixed duration: a test ends it once
    what it wanted to happen under load has happened, however slow the machine is.
    `limit_s` is only a safety net for a test that never stops it.
    """

    def __init__(
        self, url: str, model: str = "sim-model", *, concurrency: int = 16, max_tokens: int = 24, limit_s: float = 900
    ) -> None:
        self.report: Any = None
        self.error: BaseException | None = None
        self._args = (url, model, concurrency, max_tokens, limit_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._hit_limit = False
        self._live = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sustained-load", daemon=True)
        self.started_at = 0.0

    def _run(self) -> None:
        try:
            self.report = asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - surfaced by result()
            self.error = exc
        finally:
            self._live.set()

    async def _main(self) -> Any:
        from bench.openai_load import run_load

        url, model, concurrency, max_tokens, limit_s = self._args
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._live.set()
        report = await run_load(
            url, model, duration_s=limit_s, concurrency=concurrency, max_tokens=max_tokens, stop=self._stop
        )
        self._hit_limit = not self._stop.is_set()
        return report

    def __enter__(self) -> "SustainedLoad":
        self._thread.start()
        assert self._live.wait(30), "the load thread did not start"
        assert self.error is None, f"load generator crashed: {self.error!r}"
        self.started_at = time.monotonic()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop has just closed: the load is over anyway
                pass

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._thread.join(timeout=120)

    def result(self) -> Any:
        assert not self._thread.is_alive(), "load did not stop"
        assert self.error is None, f"load generator crashed: {self.error!r}"
        assert not self._hit_limit, "the load ran into its safety limit instead of being stopped by the test"
        assert self.report is not None
        return self.report
