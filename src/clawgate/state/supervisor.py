"""One owner for background tasks: strong references, failures logged and counted, one way to stop.

`spawn` starts a one-shot task and keeps it until it ends; `loop` runs a long-lived
coroutine function again (after `retry_s`) whenever it raises; `aclose` cancels
everything and waits, bounded. A failure is logged with the task's name and counted
under that name (`errors`, exposed in `status` and as `clawgate_task_errors_total{task}`),
so no exception is ever lost to "Task exception was never retrieved". Names are a
bounded vocabulary ("connection-close", "ticks"), not per-object ids: they label a metric.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

from clawgate.state.tasks import cancel_all, cancel_and_wait

log = structlog.get_logger("clawgate.tasks")

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class Supervisor:
    def __init__(
        self, *, sleep: Sleep = asyncio.sleep, on_error: Callable[[str, BaseException], None] | None = None
    ) -> None:
        self._sleep = sleep
        self._on_error = on_error
        # One-shot tasks, each held until it ends (`len()` counts them).
        self.tasks: set[asyncio.Task[Any]] = set()
        # Long-lived loops by name, held until `aclose`.
        self.loops: dict[str, asyncio.Task[None]] = {}
        self.errors: Counter[str] = Counter()
        # One-shot tasks alive now, by name: each owner's bound is registered on its own name.
        self.running: Counter[str] = Counter()
        self.closed = False

    def __len__(self) -> int:
        return len(self.tasks)

    def __bool__(self) -> bool:
        # An owner, not a container: one holding no task now is still the one to use, so
        # `tasks or Supervisor()` keeps it (without this, `__len__` made an idle one falsy).
        return True

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        self.running[name] += 1
        task.add_done_callback(self._spawned_done)
        return task

    def loop(self, name: str, fn: Callable[[], Awaitable[None]], *, retry_s: float) -> asyncio.Task[None]:
        """Run `fn()` until it returns; when it raises, count it, pause `retry_s`, run it again."""
        if name in self.loops and not self.loops[name].done():
            raise RuntimeError(f"loop {name!r} is already running")
        task = asyncio.create_task(self._run_loop(name, fn, retry_s), name=name)
        self.loops[name] = task
        return task

    async def stop_loop(self, name: str) -> None:
        """Cancel one loop and wait until it has unwound (nothing if it is not running)."""
        await cancel_and_wait(self.loops.pop(name, None))

    async def stop_loops(self, *names: str, timeout_s: float = 10.0) -> list[str]:
        """Cancel these loops and wait until they have unwound, at most `timeout_s`; return
        the names of those still running then (logged)."""
        late = await cancel_all([t for n in names if (t := self.loops.pop(n, None)) is not None], timeout_s)
        if late:
            log.error("background tasks ignored cancellation", tasks=late, timeout_s=timeout_s)
        return late

    def record_failure(self, name: str, exc: BaseException) -> None:
        """Count a failure that a task caught itself (a loop with its own retry policy)."""
        self._failed(name, exc)

    async def _run_loop(self, name: str, fn: Callable[[], Awaitable[None]], retry_s: float) -> None:
        while True:
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(name, exc)
            await self._sleep(retry_s)

    def live(self, name: str) -> int:
        """How many one-shot tasks of this name are alive now."""
        return self.running[name]

    def _spawned_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        name = task.get_name()
        self.running[name] -= 1
        if self.running[name] <= 0:
            del self.running[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._failed(task.get_name(), exc)

    def _failed(self, name: str, exc: BaseException) -> None:
        self.errors[name] += 1
        log.error("background task failed", task=name, error=repr(exc))
        if self._on_error is not None:
            self._on_error(name, exc)

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": len(self.tasks),
            "loops": sorted(name for name, task in self.loops.items() if not task.done()),
            "errors": dict(self.errors),
        }

    async def aclose(self, timeout_s: float = 5.0) -> list[str]:
        """Cancel every task and loop and wait for them, at most `timeout_s`; return the names of
        those still running then (logged)."""
        self.closed = True
        pending = [t for t in (*self.tasks, *self.loops.values()) if not t.done()]
        for task in pending:
            task.cancel()
        if not pending:
            return []
        _done, late = await asyncio.wait(pending, timeout=timeout_s)
        stragglers = sorted(t.get_name() for t in late)
        if stragglers:
            log.warning("background tasks did not stop in time", tasks=stragglers, timeout_s=timeout_s)
        return stragglers


__all__ = ["Supervisor"]
