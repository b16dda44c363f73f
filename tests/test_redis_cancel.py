"""A task cancelled while it waits on the Redis store's own client stops.

redis-py 8.1 on Python 3.11 can swallow a cancellation that lands while a command is being
sent (its `asyncio.wait_for` around the send returns the finished send's result instead of
raising): the call returns normally and the cancelled task runs on. The cron and webhook
loops call the store's client directly; a swallowed cancellation made `cron.stop`, and so
the gateway's stop, wait forever (seen as a gateway that did not stop within 30 s after
SIGTERM, about once in a dozen stops right after a start). The store's client re-raises a
cancellation that a command swallowed.

The race is a matter of timing: each attempt cancels a loop of store calls after a random
delay of up to 3 ms, and every attempt must end within a bounded wait. Real Redis, real
time (the race is in the client's I/O, no fake clock reaches it); bounded loops.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from clawgate.store.cron_store import RedisCronStore
from clawgate.store.redis_store import RedisStore
from clawgate.testing.redis import drop_redis_prefix

pytestmark = pytest.mark.redis

ATTEMPTS = 300


async def _cancel_often(call: object, rng: random.Random) -> list[int]:
    """Cancel a task looping on `call()` after a random delay, ATTEMPTS times; return the
    attempts whose task was still running 2 s after its cancellation."""

    async def body() -> None:
        while True:
            await call()  # type: ignore[operator]

    stuck: list[int] = []
    for i in range(ATTEMPTS):
        task = asyncio.create_task(body())
        await asyncio.sleep(rng.random() * 0.003)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        if not done:
            stuck.append(i)
            task.cancel()  # a second request lands (the loop awaits again): clean up
            await asyncio.wait([task], timeout=2)
            if len(stuck) >= 3:
                break
    return stuck


async def _pipeline(store: RedisStore, prefix: str) -> None:
    async with store.client.pipeline(transaction=True) as pipe:
        pipe.get(f"{prefix}:a")
        pipe.get(f"{prefix}:b")
        await pipe.execute()


async def test_a_loop_on_the_store_client_stops_when_cancelled(redis_url: str) -> None:
    prefix = f"cgtest:{uuid.uuid4().hex[:10]}"
    store = RedisStore(redis_url, prefix=prefix)
    await store.open()
    cron = RedisCronStore(store, job_ttl_s=60, history_ttl_s=60)
    rng = random.Random(7)
    try:
        # What the cron loop does between its sleeps (`next_due_ms`, `due_jobs`), and a
        # pipeline (a job's write), each on the store's client.
        assert await _cancel_often(cron.next_due_ms, rng) == []
        assert await _cancel_often(lambda: cron.due_jobs(0, 100), rng) == []
        assert await _cancel_often(lambda: _pipeline(store, prefix), rng) == []
    finally:
        await store.close()
        await drop_redis_prefix(redis_url, prefix)
