"""A redis-py client that never swallows its caller's cancellation.

redis-py (seen with 8.1 on Python 3.11; redis/redis-py#2551) can lose a task's cancellation
inside a command: a client with a `socket_timeout` sends through `asyncio.wait_for`, which
on 3.11 returns the finished send's result when the cancellation lands in the same loop
turn, and a (re)connect can do the same. The command then returns normally and a cancelled
loop runs on; a stop that waits for it waits forever (the gateway's stop did, about once in
a dozen stops right after a start, in the cron loop).

`checkpoint()` raises a cancellation that was requested and not delivered. `CancelSafeRedis`
calls it after every command and every pipeline: the store's own client is one (cron,
webhooks and the store use it directly); the scale-out modules call `checkpoint` through
their `redis_call`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline


def checkpoint() -> None:
    """Raise CancelledError if this task was asked to cancel and the request was lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class CancelSafePipeline(Pipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        res = await super().execute(raise_on_error)
        checkpoint()
        return res


class CancelSafeRedis(aioredis.Redis):
    async def execute_command(self, *args: Any, **options: Any) -> Any:
        res = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        checkpoint()
        return res

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> CancelSafePipeline:
        return CancelSafePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
