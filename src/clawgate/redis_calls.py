"""Helpers shared by the Redis I/O modules (dispatcher, fan-out)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from redis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

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


async def guarded(
    name: str,
    loop: Callable[[], Coroutine[Any, Any, None]],
    *,
    log: FilteringBoundLogger,
    label: str,
    retry_s: float,
) -> None:
    """Run a background loop that never dies silently: log, pause `retry_s`, restart."""
    while True:
        checkpoint()
        try:
            await loop()
            return
        except (RedisError, OSError) as exc:
            log.warning(f"{label} loop: redis error", loop=name, error=str(exc))
        except Exception:
            log.exception(f"{label} loop failed", loop=name)
        await asyncio.sleep(retry_s)
