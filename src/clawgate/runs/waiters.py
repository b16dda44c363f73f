"""Who waits for a run's end: O(1) add and remove, capped per run and per connection.

A run's final answer goes to its listeners: the `agent` request that started or
joined it (a deferred response) and every parked `agent.wait`. They used to be a
plain list on the run: each `agent` retry of a running key appended one that no
disconnect ever removed, and a cancelled wait left by `list.remove`, so
cancelling 40,000 parked waits took time quadratic in their number and stalled
the loop for seconds.

Here each listener has an integer handle: a run keeps its listeners in an
insertion-ordered dict (`RunListeners`), and `Waiters` indexes the handles a
connection owns, so a finished wait, a closed connection or the run's end
removes exactly its own entries in O(1) each. A connection may own at most
`max_per_connection` waiters (FORBIDDEN beyond), a run may have at most
`max_per_run` (UNAVAILABLE, retryable: other waiters leave). Listeners without
an owner (the gateway's own) are not capped.

Pure bookkeeping: no awaits, no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

from clawgate.errors import Forbidden, Unavailable
from clawgate.ids import ConnId

R = TypeVar("R")
Listener = Callable[[R], None]


def _nothing() -> None:
    return None


class RunListeners(Generic[R]):
    """The listeners of one run, in the order they were added; closed once the run settled."""

    __slots__ = ("_entries", "closed")

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Listener[R], ConnId | None]] = {}
        self.closed = False

    def __len__(self) -> int:
        return len(self._entries)


class Waiters(Generic[R]):
    def __init__(self, *, max_per_run: int, max_per_connection: int) -> None:
        self.max_per_run = max_per_run
        self.max_per_connection = max_per_connection
        self._handles = itertools.count(1)
        # conn -> handle -> where that waiter lives: the run's listeners, or (a waiter on a run
        # another process executes) the function that cancels it.
        self._owned: dict[ConnId, dict[int, RunListeners[R] | Callable[[], None]]] = {}
        self.total = 0  # waiters owned by connections (the registry reports this)
        self.refused = 0

    # -- caps ---------------------------------------------------------------------------
    def check_connection(self, owner: ConnId | None) -> None:
        """Refuse (FORBIDDEN) when `owner` already owns as many waiters as allowed."""
        if owner is None:
            return
        owned = self._owned.get(owner)
        if owned is not None and len(owned) >= self.max_per_connection:
            self.refused += 1
            raise Forbidden(
                f"at most {self.max_per_connection} waiters per connection",
                details={"maxWaitersPerConnection": self.max_per_connection},
            )

    def check_run(self, run_id: str, count: int) -> None:
        """Refuse (UNAVAILABLE, retryable) a new waiter on a run that already has `count`."""
        if count >= self.max_per_run:
            self.refused += 1
            raise Unavailable(
                f"at most {self.max_per_run} waiters per run",
                retry_after_ms=1000,
                details={"runId": run_id, "maxWaitersPerRun": self.max_per_run},
            )

    # -- listeners on a local run ------------------------------------------------------------
    def add(
        self, run_id: str, listeners: RunListeners[R], listener: Listener[R], owner: ConnId | None
    ) -> int:
        """Add `listener` to a run's listeners; returns its handle. Raises when a cap is reached."""
        if owner is not None:
            self.check_run(run_id, len(listeners))
            self.check_connection(owner)
        handle = next(self._handles)
        listeners._entries[handle] = (listener, owner)
        if owner is not None:
            self._index(owner, handle, listeners)
        return handle

    def remove(self, listeners: RunListeners[R], handle: int) -> None:
        entry = listeners._entries.pop(handle, None)
        if entry is not None and entry[1] is not None:
            self._unindex(entry[1], handle)

    def settle(self, listeners: RunListeners[R]) -> list[Listener[R]]:
        """The run ended: close its listener set and hand back every listener, once."""
        entries, listeners._entries = listeners._entries, {}
        listeners.closed = True
        for handle, (_listener, owner) in entries.items():
            if owner is not None:
                self._unindex(owner, handle)
        return [listener for listener, _owner in entries.values()]

    # -- waiters whose listener lives elsewhere (another process executes the run) --------------
    def reserve(self, owner: ConnId | None) -> int:
        """Count a waiter against `owner`'s cap; `bind` its cancel function, `release` it when done."""
        self.check_connection(owner)
        handle = next(self._handles)
        if owner is not None:
            self._index(owner, handle, _nothing)
        return handle

    def bind(self, owner: ConnId | None, handle: int, cancel: Callable[[], None]) -> None:
        owned = self._owned.get(owner) if owner is not None else None
        if owned is not None and handle in owned:
            owned[handle] = cancel

    def release(self, owner: ConnId | None, handle: int) -> None:
        if owner is not None:
            self._unindex(owner, handle)

    # -- connections ---------------------------------------------------------------------------
    def drop_connection(self, owner: ConnId) -> int:
        """The connection closed: remove every waiter it owned. Returns how many."""
        owned = self._owned.pop(owner, None)
        if not owned:
            return 0
        self.total -= len(owned)
        for handle, where in owned.items():
            if isinstance(where, RunListeners):
                where._entries.pop(handle, None)
            else:
                where()
        return len(owned)

    def owned_by(self, owner: ConnId) -> int:
        owned = self._owned.get(owner)
        return 0 if owned is None else len(owned)

    @property
    def connections(self) -> int:
        return len(self._owned)

    def _index(self, owner: ConnId, handle: int, where: RunListeners[R] | Callable[[], None]) -> None:
        owned = self._owned.get(owner)
        if owned is None:
            owned = self._owned[owner] = {}
        owned[handle] = where
        self.total += 1

    def _unindex(self, owner: ConnId, handle: int) -> None:
        owned = self._owned.get(owner)
        if owned is None or owned.pop(handle, None) is None:
            return
        self.total -= 1
        if not owned:
            del self._owned[owner]
