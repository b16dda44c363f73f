"""Global execution slots: at most `size` runs of one kind (main or subagent) at once.

A counting semaphore whose waiters are served strictly first come, first served, and
whose waiters need not be tasks: a session lane waits here as a plain object (a place
in a deque) and is given its worker task only when a slot is granted to it, so a queued
run does not hold a parked task. A caller that does hold a task (a run handed over by
the Redis dispatcher) waits with `acquire`, in the same FIFO.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Protocol


class Waiter(Protocol):
    def __hash__(self) -> int: ...

    def granted(self, slots: Slots) -> bool:
        """A slot of `slots` is now this waiter's. Return False to refuse it (the waiter
        went away meanwhile): it goes to the next waiter."""


class _TaskWaiter:
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def granted(self, slots: Slots) -> bool:
        if self.future.done():  # its task was cancelled while waiting
            return False
        self.future.set_result(None)
        return True


class Slots:
    __slots__ = ("_waiters", "free", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        # FIFO with O(1) removal from anywhere (an abort of a queued run takes its lane out):
        # a deque's `remove` is O(n), so aborting n queued lanes out of order was O(n^2).
        # Waiters are compared by identity (lanes and task waiters define no equality).
        self._waiters: OrderedDict[Waiter, None] = OrderedDict()

    @property
    def contended(self) -> bool:
        """Whether someone waits for a slot (a holder should hand its slot on)."""
        return bool(self._waiters)

    def request(self, waiter: Waiter) -> None:
        """Grant a slot to `waiter` now if one is free and nobody waits, else queue it."""
        if self.free and not self._waiters:
            self.free -= 1
            if waiter.granted(self):
                return
            self.free += 1
            return
        self._waiters[waiter] = None

    def cancel(self, waiter: Waiter) -> bool:
        """Take a queued waiter out of the queue. Returns whether it was queued."""
        try:
            del self._waiters[waiter]
        except KeyError:
            return False
        return True

    def release(self) -> None:
        """Give a held slot back: to the first waiter that takes it, else to the pool."""
        waiters = self._waiters
        while waiters:
            if waiters.popitem(last=False)[0].granted(self):
                return
        self.free += 1

    async def acquire(self) -> None:
        """Wait for a slot (as a task); `release()` it when done."""
        if self.free and not self._waiters:
            self.free -= 1
            return
        waiter = _TaskWaiter(asyncio.get_running_loop().create_future())
        self._waiters[waiter] = None
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # granted, then cancelled before it could run: pass it on
            else:
                self.cancel(waiter)
            raise
