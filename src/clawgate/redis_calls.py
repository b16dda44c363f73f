"""Helpers shared by the Redis I/O modules (dispatcher, fan-out)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def checkpoint() -> None:
    """Raise if this task was asked to cancel. redis-py can swallow a task's cancellation
    while it (re)connects (redis/redis-py#2551; seen with redis-py 8.1 on Python 3.11): the
    call then returns normally and a cancelled loop would run on forever. Every Redis call
    of the dispatcher and the fan-out goes through `call`, which re-checks."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def call(aw: Awaitable[T]) -> T:
    res = await aw
    checkpoint()
    return res


def text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
