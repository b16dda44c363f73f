"""Fencing on the real Redis, component by component (deterministic: no process is paused,
the lease is taken away by deleting or overwriting the lock key, which is what its expiry
and another holder do).

- The store writes a run's end once: a second end, an end whose fence no longer holds, and
  a late "running" write all leave the first end in place.
- The dispatcher: lease tokens increase, and a holder that lost its lease leaves its run in
  the processing list, where the next holder finds it and reports it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from clawgate.scaleout.dispatch import RedisDispatcher
from clawgate.store.base import Fence
from clawgate.store.records import RunRecord
from clawgate.store.redis_store import RedisStore
from clawgate.testing.redis import drop_redis_prefix
from helpers import wait_until

pytestmark = pytest.mark.redis


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    prefix = f"cgtest:{uuid.uuid4().hex[:12]}"
    client = aioredis.from_url(redis_url)
    try:
        yield client, prefix
    finally:
        await drop_redis_prefix(redis_url, prefix)
        await client.aclose()


@pytest.fixture
async def store(redis_url: str, admin: tuple[aioredis.Redis, str]) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url, prefix=admin[1])
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _run(run_id: str, status: str = "running") -> RunRecord:
    return RunRecord(
        run_id=run_id, session_key="agent:main:f", agent_id="main", message="m", status=status,  # type: ignore[arg-type]
        accepted_at=1.0, started_at=2.0,
    )  # fmt: skip


def _ended(run_id: str, status: str, error: str | None = None) -> RunRecord:
    rec = _run(run_id, status)
    rec.ended_at, rec.error = 3.0, error
    return rec


async def test_the_first_end_stays_and_the_others_get_it(store: RedisStore) -> None:
    await store.put_run(_run("r1"))
    first = _ended("r1", "error", "interrupted by gateway restart")
    assert await store.end_run(first) is first
    second = _ended("r1", "ok")
    got = await store.end_run(second)
    assert got is not None and (got.status, got.error) == ("error", "interrupted by gateway restart")
    # A late open write (a paused executor's "running") does not reopen the run either.
    await store.put_run(_run("r1"))
    stored = await store.get_run("r1")
    assert stored is not None and (stored.status, stored.error) == ("error", "interrupted by gateway restart")


async def test_an_end_whose_fence_is_gone_is_refused(
    store: RedisStore, admin: tuple[aioredis.Redis, str]
) -> None:
    redis, prefix = admin
    lock = f"{prefix}:dispatch:lock:agent:main:f"
    await store.put_run(_run("r2"))
    await redis.set(lock, "8")  # the lease passed to a newer holder
    assert await store.end_run(_ended("r2", "ok"), Fence(lock, "7")) is None
    stored = await store.get_run("r2")
    assert stored is not None and stored.status == "running"
    await redis.delete(lock)  # expired, nobody holds it yet: still not ours
    assert await store.end_run(_ended("r2", "ok"), Fence(lock, "7")) is None
    # The current holder ends it.
    await redis.set(lock, "8")
    mine = _ended("r2", "error", "interrupted by gateway restart")
    assert await store.end_run(mine, Fence(lock, "8")) is mine
    got = await store.end_run(_ended("r2", "ok"), Fence(lock, "8"))
    assert got is not None and got.status == "error"


async def test_a_holder_that_lost_its_lease_leaves_its_run_for_the_next_one(
    redis_url: str, admin: tuple[aioredis.Redis, str]
) -> None:
    redis, prefix = admin
    session = "agent:main:fenced"
    gate = asyncio.Event()
    started: list[str] = []
    orphaned: list[tuple[str, str]] = []
    tokens: list[str] = []
    clients = [aioredis.from_url(redis_url, socket_timeout=10) for _ in range(2)]

    def make(name: str) -> RedisDispatcher:
        async def execute(run_id: str, key: str) -> None:
            lease = dispatchers[name].lease(key)
            assert lease is not None
            tokens.append(lease[1])
            started.append(run_id)
            await gate.wait()

        async def on_orphan(run_id: str, key: str) -> None:
            lease = dispatchers[name].lease(key)
            assert lease is not None
            tokens.append(lease[1])
            orphaned.append((name, run_id))

        client = clients[len(dispatchers)]
        return RedisDispatcher(
            client, prefix=prefix, consumer=f"{name}-{uuid.uuid4().hex[:6]}",
            execute=execute, on_orphan=on_orphan, lease_s=30, claim_idle_s=0.4,
        )  # fmt: skip

    dispatchers: dict[str, RedisDispatcher] = {}
    dispatchers["a"] = make("a")
    a = dispatchers["a"]
    try:
        a.start()
        await a.push("r0", session)
        await wait_until(lambda: started == ["r0"], what="A executing r0")
        # A's lease is gone (expired, as after a long pause); A does not know yet.
        await redis.delete(f"{prefix}:lock:{session}")
        gate.set()
        await wait_until(lambda: a.serving == 0, what="A's handler done")
        # A could not take r0 out of the processing list: the next holder will report it.
        assert await redis.lrange(f"{prefix}:qp:{session}", 0, -1) == [b"r0"]
        assert a.lease(session) is None
        await a.stop()
        # The next holder: the session's lease deadline in the active index makes it recover.
        await redis.zadd(f"{prefix}:active", {session: 0})
        dispatchers["b"] = make("b")
        b = dispatchers["b"]
        b.start()
        await wait_until(lambda: orphaned == [("b", "r0")], what="B reports r0")
        await wait_until(lambda: b.serving == 0, what="B's handler done")
        assert await redis.lrange(f"{prefix}:qp:{session}", 0, -1) == []
        assert int(tokens[1]) > int(tokens[0])  # every lease's token is larger than the one before
        await b.stop()
    finally:
        for d in dispatchers.values():
            await d.kill()
        for c in clients:
            await c.aclose()


async def test_an_orphan_whose_report_fails_is_reported_again_without_a_new_push(
    redis_url: str, admin: tuple[aioredis.Redis, str]
) -> None:
    redis, prefix = admin
    session = "agent:main:retry-orphan"
    started: list[str] = []
    reports: list[str] = []
    clients = [aioredis.from_url(redis_url, socket_timeout=10) for _ in range(2)]

    async def execute(run_id: str, key: str) -> None:
        started.append(run_id)
        await asyncio.Event().wait()  # still executing when its process dies

    async def on_orphan(run_id: str, key: str) -> None:
        reports.append(run_id)
        if len(reports) == 1:
            raise RuntimeError("store unavailable")  # a transient failure of the first report

    def make(name: str, client: aioredis.Redis) -> RedisDispatcher:
        return RedisDispatcher(
            client, prefix=prefix, consumer=f"{name}-{uuid.uuid4().hex[:6]}",
            execute=execute, on_orphan=on_orphan, lease_s=2, claim_idle_s=0.4,
        )  # fmt: skip

    a, b = make("a", clients[0]), make("b", clients[1])
    try:
        a.start()
        await a.push("r0", session)
        await wait_until(lambda: started == ["r0"], what="A executing r0")
        await a.kill()
        b.start()
        # The first report raises; the session is handed off, and the report is retried
        # although nothing else is ever pushed to this session.
        await wait_until(lambda: len(reports) >= 2, what="the orphan reported again")
        await wait_until(lambda: b.orphans == 1, what="the orphan dropped")
        assert await redis.lrange(f"{prefix}:qp:{session}", 0, -1) == []
        await wait_until(lambda: b.serving == 0, what="B's handler done")
        await b.stop()
    finally:
        for d in (a, b):
            await d.kill()
        for c in clients:
            await c.aclose()
