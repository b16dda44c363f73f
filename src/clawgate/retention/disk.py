"""Disk admission: measure the state dir off the event loop; refuse new work past the budget.

`disk_budget_bytes` bounds the state dir (store files, attachments, the ended-hook
log); `disk_free_min_bytes` keeps a floor of free space on its file system, so the
gateway refuses work with UNAVAILABLE before a write meets ENOSPC. Both are
re-measured on an interval and after each retention pass, so admission opens again
as soon as retention has made room.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from clawgate.retention import files
from clawgate.retention.policy import disk_verdict
from clawgate.state.supervisor import Supervisor
from clawgate.state.tasks import cancel_and_wait

log = structlog.get_logger("clawgate.disk")


class DiskMonitor:
    def __init__(
        self,
        state_dir: Path,
        *,
        budget_bytes: int,
        free_min_bytes: int,
        interval_s: float,
        extra_files: Callable[[], list[Path]] = list,
    ) -> None:
        self.state_dir = state_dir
        self.budget_bytes = budget_bytes
        self.free_min_bytes = free_min_bytes
        self.interval_s = interval_s
        self.extra_files = extra_files
        self.used_bytes = 0
        self.free_bytes: int | None = None
        self._reason: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, tasks: Supervisor | None = None) -> None:
        """Start the sampler, under the gateway's task supervisor when given one."""
        if self._task is None:
            self._task = (tasks or Supervisor()).loop(
                "clawgate-disk-sampler", self._loop, retry_s=self.interval_s
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except OSError as exc:  # measuring must never stop the sampler
                log.warning("disk usage sample failed", error=str(exc))
            # Real time on purpose, like the RSS sampler: this measures the machine.
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> str | None:
        used, free = await asyncio.to_thread(files.usage, self.state_dir, self.extra_files())
        self.used_bytes, self.free_bytes = used, free
        reason = disk_verdict(used, self.budget_bytes, free, self.free_min_bytes)
        if reason != self._reason:
            log.warning("disk admission closed", reason=reason) if reason else log.info("disk admission open")
        self._reason = reason
        return reason

    def reason(self) -> str | None:
        return self._reason
