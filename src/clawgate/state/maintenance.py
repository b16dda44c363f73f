"""The one maintenance scheduler: runs every registered sweep on an interval.

Rules it keeps (docs/design.md, rules 5 and 6): it starts with the gateway,
unconditionally, whatever the workload (the reference gateway started its
sweeper only when some record had an archive time, so session-mode runs were
never swept); a sweep that raises is logged with its name and counted, and the
other sweeps of the tick and all later ticks still run (the reference had a
sweep that threw on every tick and took the whole tick with it).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import structlog

from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor

log = structlog.get_logger("clawgate.maintenance")


class Maintenance:
    def __init__(
        self,
        registry: StateRegistry,
        clock: Clock,
        interval_s: float,
        *,
        on_sweep_error: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.interval_s = interval_s
        self.ticks = 0
        self.errors: dict[str, int] = {}
        self.last_removed: dict[str, int] = {}
        self._on_sweep_error = on_sweep_error
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, tasks: Supervisor | None = None) -> None:
        """Start the loop, under the gateway's task supervisor when given one."""
        if self.running:
            return
        self._task = (tasks or Supervisor()).loop("clawgate-maintenance", self._loop, retry_s=self.interval_s)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            await self.clock.sleep(self.interval_s)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Sweeps are isolated inside run_once; this guards the loop itself (rule 5: the
                # scheduler never stops while the gateway runs).
                log.exception("maintenance tick failed")

    async def run_once(self) -> dict[str, int]:
        """One tick: every sweep, each isolated. Returns removed counts by sweep name."""
        async with self._lock:
            self.ticks += 1
            removed: dict[str, int] = {}
            for name, sweep in self.registry.sweeps.items():
                try:
                    result: Any = sweep()
                    if inspect.isawaitable(result):
                        result = await result
                    removed[name] = int(result) if isinstance(result, int) else 0
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.errors[name] = self.errors.get(name, 0) + 1
                    log.exception("sweep failed", sweep=name)
                    if self._on_sweep_error is not None:
                        try:
                            self._on_sweep_error(name)
                        except Exception:
                            log.exception("sweep error callback failed", sweep=name)
            self.last_removed = removed
            return removed
