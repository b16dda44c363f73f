"""Admission control: refuse new runs (UNAVAILABLE, retryable) instead of growing until the OOM killer.

Three signals: entries tracked per run (`max_tracked_runs`), process RSS
(`memory_budget_bytes`, derived from the machine's RAM unless set; 0 disables) and the
disk (`disk_budget_bytes`, `disk_free_min_bytes`; retention/disk.py). RSS is sampled in
the background, not per request, so the check on the hot path is two comparisons.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psutil

from clawgate.errors import Unavailable
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.state.tasks import cancel_and_wait


class Admission:
    def __init__(
        self,
        registry: StateRegistry,
        *,
        max_tracked_runs: int,
        memory_budget_bytes: int,
        sample_interval_s: float = 0.5,
    ) -> None:
        self.registry = registry
        self.max_tracked_runs = max_tracked_runs
        self.memory_budget_bytes = memory_budget_bytes
        self.sample_interval_s = sample_interval_s
        self._proc = psutil.Process()
        self.rss: int = int(self._proc.memory_info().rss)
        self.refused = 0
        # Set by the gateway: why the disk cannot take more (budget or free-space floor).
        self.disk_reason: Callable[[], str | None] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, tasks: Supervisor | None = None) -> None:
        """Start the sampler, under the gateway's task supervisor when given one."""
        if self._task is None:
            self._task = (tasks or Supervisor()).loop(
                "clawgate-rss-sampler", self._sample_loop, retry_s=self.sample_interval_s
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sample_interval_s)
            self.sample()

    def sample(self) -> int:
        self.rss = int(self._proc.memory_info().rss)
        return self.rss

    def reason(self) -> str | None:
        tracked = self.registry.tracked_entries()
        if tracked >= self.max_tracked_runs:
            return f"tracking {tracked} runs (maxTrackedRuns {self.max_tracked_runs})"
        if self.memory_budget_bytes and self.rss > self.memory_budget_bytes:
            return f"RSS {self.rss} bytes over memoryBudgetBytes {self.memory_budget_bytes}"
        if self.disk_reason is not None:
            return self.disk_reason()
        return None

    @property
    def open(self) -> bool:
        return self.reason() is None

    def check(self) -> None:
        reason = self.reason()
        if reason is not None:
            self.refused += 1
            raise Unavailable(
                f"gateway overloaded: {reason}", retry_after_ms=1000, details={"reason": reason}
            )
