"""Stopping an owned background task: cancel it and wait until it has unwound."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def cancel_all(tasks: Iterable[asyncio.Task[Any]], timeout_s: float) -> list[str]:
    """Cancel every task and wait until they have unwound, at most `timeout_s`; return the
    names of those still running then (a task can swallow its cancellation)."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return []
    _done, late = await asyncio.wait(pending, timeout=timeout_s)
    return sorted(t.get_name() for t in late)
