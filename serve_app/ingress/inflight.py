"""Per-replica count of requests this gateway process has in flight.

Scraped vLLM metrics lag by a scrape interval; the local count reacts at once,
so load-aware policies add the two. The tracker is plain synchronous code: it
is safe to use from one asyncio event loop without importing asyncio, because
nothing here awaits.

Each replica's count lives in a small mutable cell, and every lease keeps a
reference to the cell it incremented. That is what lets ``forget`` drop a
departed replica outright: leases still open on it later decrement a detached
cell, so they can neither drive a count negative nor skew the count of a
replica that comes back under the same id.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from types import TracebackType


class _Cell:
    """A mutable counter; shared by the tracker's dict and the leases on it."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class InflightLease:
    """One in-flight request on one replica, released exactly once.

    For code that cannot hold a ``with`` block open, e.g. a streaming body that
    outlives the handler. ``release()`` is idempotent; a lease that is garbage
    collected unreleased (a body that was never iterated, so its ``finally``
    never ran) releases itself so the count cannot leak forever.
    """

    __slots__ = ("_tracker", "_replica_id", "_cell")

    def __init__(self, tracker: InflightTracker, replica_id: str, cell: _Cell) -> None:
        self._tracker = tracker
        self._replica_id = replica_id
        self._cell: _Cell | None = cell

    @property
    def replica_id(self) -> str:
        return self._replica_id

    @property
    def released(self) -> bool:
        return self._cell is None

    def release(self) -> None:
        cell = self._cell
        if cell is None:
            return
        self._cell = None
        self._tracker._decrement(self._replica_id, cell)

    def __del__(self) -> None:
        # Safety net only; correct callers release explicitly.
        try:
            self.release()
        except Exception:  # interpreter shutdown: nothing useful left to do
            pass


class _Scope:
    """Context manager returned by ``InflightTracker.track``."""

    __slots__ = ("_tracker", "_replica_id", "_lease")

    def __init__(self, tracker: InflightTracker, replica_id: str) -> None:
        self._tracker = tracker
        self._replica_id = replica_id
        self._lease: InflightLease | None = None

    def __enter__(self) -> None:
        self._lease = self._tracker.acquire(self._replica_id)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Runs for normal exit, exceptions, CancelledError and GeneratorExit alike.
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()


class InflightTracker:
    """Requests this gateway replica has in flight per replica_id.

    Counts never go negative, and a replica at zero has no entry, so the dict
    holds at most the replicas that currently have requests open.
    """

    __slots__ = ("_cells",)

    def __init__(self) -> None:
        self._cells: dict[str, _Cell] = {}

    def count(self, replica_id: str) -> int:
        cell = self._cells.get(replica_id)
        return cell.n if cell is not None else 0

    def track(self, replica_id: str) -> AbstractContextManager[None]:
        """``with tracker.track(rid):`` counts the block as one request on ``rid``."""
        return _Scope(self, replica_id)

    def acquire(self, replica_id: str) -> InflightLease:
        """Count one request on ``replica_id`` until the lease is released."""
        cell = self._cells.get(replica_id)
        if cell is None:
            cell = self._cells[replica_id] = _Cell()
        cell.n += 1
        return InflightLease(self, replica_id, cell)

    def snapshot(self) -> dict[str, int]:
        return {rid: cell.n for rid, cell in self._cells.items()}

    def forget(self, replica_ids_to_keep: Iterable[str]) -> None:
        """Drop every replica not in ``replica_ids_to_keep``.

        Entries at zero are already gone, so this also drops departed replicas
        that still have leases open (e.g. leaked ones); those leases then
        release into a detached cell and cannot affect anything.
        """
        keep = set(replica_ids_to_keep)
        for rid in [rid for rid in self._cells if rid not in keep]:
            del self._cells[rid]

    def __len__(self) -> int:
        return len(self._cells)

    def _decrement(self, replica_id: str, cell: _Cell) -> None:
        # Never negative by construction: each lease adds one and takes it back at most once.
        cell.n -= 1
        if cell.n == 0 and self._cells.get(replica_id) is cell:
            del self._cells[replica_id]
