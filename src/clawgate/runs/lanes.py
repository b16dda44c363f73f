"""Per-session lanes: runs of one session execute one at a time, in order (FIFO).

A lane exists only while its session has queued or running work; the lane map
is a registered bounded structure, emptied as lanes drain, and a new lane is
refused (UNAVAILABLE) once `max_lanes` lanes exist (the map used to evict its
least recently used lane instead, so a session could run two of its runs at once).

A lane waiting for a global slot (runs/slots.py) is only a place in that slot
pool's FIFO: it is given its worker task when a slot is granted to it, so a
queued run does not hold a parked task. The worker runs the lane's runs one
after the other; when others wait for a slot of the same pool, it hands its slot
on after each run and the lane queues again behind them, as it did when each
worker waited on the global semaphore before each run.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from clawgate.errors import Unavailable
from clawgate.ids import SessionKey
from clawgate.runs.slots import Slots
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.state.ttlmap import TTLMap

T = TypeVar("T")

# A lane holding at most this many runs is a list; a longer one becomes a deque.
SMALL_LANE = 16


class _Lane(Generic[T]):
    """One session's FIFO of runs, and its place in a slot pool's queue.

    Most lanes hold one run (a session per task): an empty deque costs 760 bytes, a
    one-item list 64, which is a third of the memory a queued run costs in that layout.
    A lane that grows past SMALL_LANE becomes a deque, so a long lane still pops in O(1).
    """

    __slots__ = ("_items", "key", "owner", "waiting_on")

    def __init__(self, first: T, key: SessionKey = SessionKey(""), owner: Lanes[T] | None = None) -> None:
        self.owner = owner  # None: a lane no `Lanes` drains (never granted a slot)
        self.key = key
        self._items: list[T] | deque[T] = [first]
        # The slot pool this lane is queued in (no worker yet); None while it has its worker.
        self.waiting_on: Slots | None = None

    def append(self, item: T) -> None:
        items = self._items
        if isinstance(items, list) and len(items) >= SMALL_LANE:
            items = self._items = deque(items)
        items.append(item)

    def head(self) -> T:
        return self._items[0]

    def popleft(self) -> T:
        items = self._items
        return items.pop(0) if isinstance(items, list) else items.popleft()

    def remove(self, item: T) -> None:
        """Take a queued item out. O(1) at either end, where aborting a session's queued runs
        in the order they came (or the reverse) takes them; O(n) in the middle."""
        items = self._items
        if not items:
            raise ValueError("empty lane")
        if items[0] is item:
            self.popleft()
        elif items[-1] is item:
            items.pop()
        else:
            items.remove(item)

    def __len__(self) -> int:
        return len(self._items)

    def granted(self, slots: Slots) -> bool:
        return self.owner is not None and self.owner._start(self, slots)


def _one_pool(pool: Slots) -> Callable[[object], Slots]:
    def slots(item: object) -> Slots:
        return pool

    return slots


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
        slots: Callable[[T], Slots] | None = None,
    ) -> None:
        """`execute(item)` is called with a slot of `slots(item)` held (by default every
        lane may run at once: one private pool of `max_lanes` slots)."""
        self.max_lanes = max_lanes
        # The owner of the workers: the gateway's task supervisor when given one (their
        # failures counted as "lane-drain"), a private one otherwise.
        self.tasks = tasks or Supervisor()
        # Never evicts: `push` refuses a new lane first.
        self.lanes: TTLMap[SessionKey, _Lane[T]] = TTLMap(
            "session_lanes", clock, max_size=max_lanes, lru=False
        )
        registry.register(self.lanes)
        self._execute = execute
        self._on_task_error = on_task_error
        self._slots = slots if slots is not None else _one_pool(Slots(max_lanes))
        # One per lane holding a slot (at most the pools' sizes, plus workers that have
        # handed their slot on and are returning).
        self.workers: set[asyncio.Task[None]] = set()
        registry.add("lane_workers", self.workers.__len__, ttl_s=None, max_size=max_lanes)
        self.queued = 0
        self.closed = False  # `cancel_all` was called: no lane is started any more

    def has_room(self, key: SessionKey) -> bool:
        """Whether `push(key, ...)` would be accepted now."""
        return key in self.lanes or len(self.lanes) < self.max_lanes

    def push(self, key: SessionKey, item: T) -> None:
        """Queue `item` on its session's lane. Raises Unavailable if a new lane would not fit."""
        lane = self.lanes.get(key)
        if lane is not None:
            self.queued += 1
            lane.append(item)
            return
        if len(self.lanes) >= self.max_lanes:
            raise Unavailable(
                f"gateway overloaded: {len(self.lanes)} session lanes (at most {self.max_lanes})",
                retry_after_ms=1000,
                details={"maxLanes": self.max_lanes},
            )
        self.queued += 1
        lane = _Lane(item, key, self)
        self.lanes.set(key, lane)
        self._queue(lane)

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
        slots = lane.waiting_on
        if slots is not None and (not lane or self._slots(lane.head()) is not slots):
            # Queued for a slot with nothing left to run, or for a pool its new first run
            # does not use: out of that queue (and gone, or queued for the right pool).
            slots.cancel(lane)
            lane.waiting_on = None
            if lane:
                self._queue(lane)
            else:
                self.lanes.pop(key)
        return True

    def _queue(self, lane: _Lane[T]) -> None:
        """Queue the lane for a slot of its first run's pool (started at once if one is free)."""
        slots = self._slots(lane.head())
        lane.waiting_on = slots
        slots.request(lane)

    def _start(self, lane: _Lane[T], slots: Slots) -> bool:
        """A slot of `slots` was granted to `lane`: give it its worker."""
        if self.closed or lane.waiting_on is not slots or not lane:
            return False
        lane.waiting_on = None
        task = self.tasks.spawn(self._drain(lane, slots), name="lane-drain")
        self.workers.add(task)
        task.add_done_callback(self._worker_done)
        return True

    async def _drain(self, lane: _Lane[T], slots: Slots) -> None:
        requeue = False
        try:
            while lane:
                item = lane.popleft()
                self.queued -= 1
                await self._execute(item)
                if lane and (slots.contended or self._slots(lane.head()) is not slots):
                    # Others wait for a slot: the lane's next run queues behind them.
                    requeue = True
                    break
        finally:
            slots.release()
            if requeue and not self.closed:
                self._queue(lane)
            elif self.lanes.get(lane.key) is lane:
                self.lanes.pop(lane.key)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self.workers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._on_task_error(task.exception())  # type: ignore[arg-type]

    async def cancel_all(self) -> None:
        self.closed = True
        for task in list(self.workers):
            task.cancel()
        if self.workers:
            await asyncio.gather(*self.workers, return_exceptions=True)
