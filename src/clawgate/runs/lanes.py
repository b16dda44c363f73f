"""Per-session lanes: runs of one session execute one at a time, in order (FIFO).

A lane exists only while its session has queued or running work; the lane map
is a registered bounded structure, emptied as lanes drain. Each lane has one
worker task, and a new lane is refused (UNAVAILABLE) once `max_lanes` workers
exist: the map used to evict its least recently used lane instead, so a
session could get a second worker and run two of its runs at once, and the
worker set grew past its declared bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from clawgate.errors import Unavailable
from clawgate.ids import SessionKey
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.state.ttlmap import TTLMap

T = TypeVar("T")

# A lane holding at most this many runs is a list; a longer one becomes a deque.
SMALL_LANE = 16


class _Lane(Generic[T]):
    """One session's FIFO of runs.

    Most lanes hold one run (a session per task): an empty deque costs 760 bytes, a
    one-item list 64, which is a third of the memory a queued run costs in that layout.
    A lane that grows past SMALL_LANE becomes a deque, so a long lane still pops in O(1).
    """

    __slots__ = ("_items",)

    def __init__(self, first: T) -> None:
        self._items: list[T] | deque[T] = [first]

    def append(self, item: T) -> None:
        items = self._items
        if isinstance(items, list) and len(items) >= SMALL_LANE:
            items = self._items = deque(items)
        items.append(item)

    def popleft(self) -> T:
        items = self._items
        return items.pop(0) if isinstance(items, list) else items.popleft()

    def remove(self, item: T) -> None:
        self._items.remove(item)

    def __len__(self) -> int:
        return len(self._items)


class Lanes(Generic[T]):
    def __init__(
        self,
        clock: Clock,
        registry: StateRegistry,
        *,
        max_lanes: int,
        execute: Callable[[T], Awaitable[None]],
        on_task_error: Callable[[BaseException], None],
        tasks: Supervisor | None = None,
    ) -> None:
        self.max_lanes = max_lanes
        # The owner of the workers: the gateway's task supervisor when given one (their
        # failures counted as "lane-drain"), a private one otherwise.
        self.tasks = tasks or Supervisor()
        # Never evicts: `push` refuses a new lane first (a lane never outlives its worker).
        self.lanes: TTLMap[SessionKey, _Lane[T]] = TTLMap(
            "session_lanes", clock, max_size=max_lanes, lru=False
        )
        registry.register(self.lanes)
        self._execute = execute
        self._on_task_error = on_task_error
        self.workers: set[asyncio.Task[None]] = set()
        registry.add("lane_workers", self.workers.__len__, ttl_s=None, max_size=max_lanes)
        self.queued = 0

    def has_room(self, key: SessionKey) -> bool:
        """Whether `push(key, ...)` would be accepted now."""
        return key in self.lanes or len(self.workers) < self.max_lanes

    def push(self, key: SessionKey, item: T) -> None:
        """Queue `item` on its session's lane. Raises Unavailable if a new lane would not fit."""
        lane = self.lanes.get(key)
        if lane is not None:
            self.queued += 1
            lane.append(item)
            return
        # Workers, not lanes, are counted: a worker finishing its last run has already
        # left the map but still runs until its done callback.
        if len(self.workers) >= self.max_lanes:
            raise Unavailable(
                f"gateway overloaded: {len(self.workers)} session lanes (at most {self.max_lanes})",
                retry_after_ms=1000,
                details={"maxLanes": self.max_lanes},
            )
        self.queued += 1
        lane = _Lane(item)
        self.lanes.set(key, lane)
        task = self.tasks.spawn(self._drain(key, lane), name="lane-drain")
        self.workers.add(task)
        task.add_done_callback(self._worker_done)

    def remove(self, key: SessionKey, item: T) -> bool:
        """Drop a queued (not yet started) item, e.g. when it is aborted while waiting."""
        lane = self.lanes.get(key)
        if lane is None:
            return False
        try:
            lane.remove(item)
        except ValueError:
            return False
        self.queued -= 1
        return True

    async def _drain(self, key: SessionKey, lane: _Lane[T]) -> None:
        try:
            while lane:
                item = lane.popleft()
                self.queued -= 1
                await self._execute(item)
        finally:
            if self.lanes.get(key) is lane:
                self.lanes.pop(key)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self.workers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._on_task_error(task.exception())  # type: ignore[arg-type]

    async def cancel_all(self) -> None:
        for task in list(self.workers):
            task.cancel()
        if self.workers:
            await asyncio.gather(*self.workers, return_exceptions=True)
