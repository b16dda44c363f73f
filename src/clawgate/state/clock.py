"""The one source of time. Every TTL, timeout and timer reads it, so tests fast-forward.

`time()` is wall-clock seconds (records persist timestamps that must survive a
restart); `monotonic()` is for measuring durations; `sleep()` is the only way
code waits for time to pass.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from time import monotonic as _monotonic
from time import time as _wall_time
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, delay: float) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` after `delay` seconds of this clock's time (cheaper than a sleeping task)."""
        ...


class SystemClock:
    # The C functions themselves rather than methods that call them: the registered maps
    # read the clock for every get, set and touch (about fifty times per run).
    time = staticmethod(_wall_time)
    monotonic = staticmethod(_monotonic)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)


class _FakeTimer:
    __slots__ = ("callback", "cancelled", "clock")

    def __init__(self, callback: Callable[[], None], clock: FakeClock) -> None:
        self.callback = callback
        self.cancelled = False
        self.clock = clock

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.clock._timer_cancelled()


class FakeClock:
    """A clock that only moves when told to. `sleep()` wakes when `advance()` passes its deadline."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0
        self._counter = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None] | _FakeTimer]] = []
        self._cancelled = 0

    def _timer_cancelled(self) -> None:
        # Like asyncio's own timer heap: drop cancelled timers once they are half the heap,
        # so a long test with many cancelled timeouts does not grow without bound.
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._sleepers):
            self._sleepers = [
                item for item in self._sleepers if not (isinstance(item[2], _FakeTimer) and item[2].cancelled)
            ]
            heapq.heapify(self._sleepers)
            self._cancelled = 0

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + delay, next(self._counter), fut))
        await fut

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = _FakeTimer(callback, self)
        heapq.heappush(self._sleepers, (self._now + max(0.0, delay), next(self._counter), timer))
        return timer

    @property
    def pending_sleepers(self) -> int:
        return sum(
            1
            for _, _, f in self._sleepers
            if (isinstance(f, _FakeTimer) and not f.cancelled)
            or (isinstance(f, asyncio.Future) and not f.done())
        )

    def sleeping_until(self, deadline: float) -> int:
        """Tasks in a `sleep()` that ends at `deadline` (timers not counted): a test advances
        once the sleep it means has started, not before (an advance before it is lost on it)."""
        return sum(
            1
            for at, _, f in self._sleepers
            if at == deadline and isinstance(f, asyncio.Future) and not f.done()
        )

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._now += seconds
        self._mono += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, item = heapq.heappop(self._sleepers)
            if isinstance(item, _FakeTimer):
                if item.cancelled:
                    self._cancelled = max(0, self._cancelled - 1)
                else:
                    item.callback()
            elif not item.done():
                item.set_result(None)

    async def advance_async(self, seconds: float, *, step: float | None = None, settle: int = 5) -> None:
        """Advance in steps, letting woken tasks run after each one."""
        remaining = seconds
        step = step or seconds
        while remaining > 1e-12:
            delta = min(step, remaining)
            self.advance(delta)
            remaining -= delta
            for _ in range(settle):
                await asyncio.sleep(0)


async def wait_woken(clock: Clock, wake: asyncio.Event, timeout_s: float | None) -> None:
    """Wait until `wake` is set or `timeout_s` of `clock` time has passed (None: no timeout).

    The timer is armed before this coroutine first yields, so the timeout counts from the
    moment the caller computed it. A sleeping task started beside the wait would arm its
    timer one loop turn later, and a clock that moved in that turn (another task, or
    `FakeClock.advance`) would push the deadline past the moment it was meant for.
    """
    if timeout_s is not None and timeout_s <= 0:
        await asyncio.sleep(0)  # already due: one loop turn, as `sleep(0)` gives
        return
    timer = clock.call_later(timeout_s, wake.set) if timeout_s is not None else None
    try:
        await wake.wait()
    finally:
        if timer is not None:
            timer.cancel()
