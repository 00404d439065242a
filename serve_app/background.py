"""Background loops that must never die quietly.

A replica whose poll or probe loop has died would keep answering on a frozen view;
`check_health` (which Serve calls) fails instead, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("ray.serve")


class BackgroundLoops:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task] = []
        self._fatal: BaseException | None = None

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._died)
        self._tasks.append(task)

    def _died(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background loop %s died: %r", task.get_name(), task.exception())
            self._fatal = task.exception()

    def check(self) -> None:
        if self._fatal is not None:
            raise RuntimeError(f"background loop died: {self._fatal!r}")

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
