"""RedisDispatcher against the real Redis: several dispatchers in one event loop stand
for several gateway processes (each has its own connection pool and consumer name).

Recovery tests use real, short leases (a few hundred ms): they observe Redis' native
key expiry, which no fake clock can advance.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from clawgate.scaleout.dispatch import RedisDispatcher
from clawgate.state.supervisor import Supervisor
from clawgate.store.redis_keys import GROUP
from clawgate.testing.redis import drop_redis_prefix
from helpers import wait_until

pytestmark = pytest.mark.redis


class Env:
    """One key prefix, the clients and dispatchers made under it, and a log of what ran."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"cgtest:{uuid.uuid4().hex[:12]}"
        self.admin = aioredis.from_url(url)
        self.clients: list[aioredis.Redis] = []
        self.dispatchers: list[RedisDispatcher] = []
        self.executed: list[tuple[str, str, str]] = []  # (dispatcher, session, run)
        self.orphaned: list[tuple[str, str, str]] = []
        self.inflight: collections.Counter[str] = collections.Counter()
        self.overlaps: list[tuple[str, str]] = []
        self.blockers: dict[str, asyncio.Event] = {}  # run id -> released when set
        self.started: set[str] = set()

    def make(self, name: str, **kw: Any) -> RedisDispatcher:
        client = aioredis.from_url(self.url, socket_timeout=10)
        self.clients.append(client)

        async def execute(run_id: str, session: str) -> None:
            self.inflight[session] += 1
            if self.inflight[session] > 1:
                self.overlaps.append((session, run_id))
            self.started.add(run_id)
            try:
                blocker = self.blockers.get(run_id)
                if blocker is not None:
                    await blocker.wait()
                await asyncio.sleep(0)
                if hash(run_id) % 5 == 0:
                    await asyncio.sleep(0.001)
                self.executed.append((name, session, run_id))
            finally:
                self.inflight[session] -= 1

        async def on_orphan(run_id: str, session: str) -> None:
            self.orphaned.append((name, session, run_id))

        d = RedisDispatcher(
            client, prefix=self.prefix, consumer=f"{name}-{uuid.uuid4().hex[:6]}",
            execute=execute, on_orphan=on_orphan, **kw,
        )  # fmt: skip
        self.dispatchers.append(d)
        return d

    def runs_of(self, session: str) -> list[str]:
        return [r for _, s, r in self.executed if s == session]

    async def keys(self) -> list[str]:
        return sorted([k.decode() async for k in self.admin.scan_iter(match=f"{self.prefix}:*", count=500)])

    async def ttls(self) -> dict[str, int]:
        keys = await self.keys()
        pipe = self.admin.pipeline(transaction=False)
        for k in keys:
            pipe.pttl(k)
        return dict(zip(keys, await pipe.execute(), strict=True))

    async def close(self) -> None:
        for d in self.dispatchers:
            await d.kill()
        for c in self.clients:
            await c.aclose()
        await drop_redis_prefix(self.url, self.prefix)
        await self.admin.aclose()


@pytest.fixture
async def env(redis_url: str) -> AsyncIterator[Env]:
    e = Env(redis_url)
    try:
        yield e
    finally:
        await e.close()


def blocked(env: Env, run_id: str) -> asyncio.Event:
    ev = asyncio.Event()
    env.blockers[run_id] = ev
    return ev


async def push_all(pushes: list[tuple[RedisDispatcher, str, str]]) -> None:
    for d, run_id, session in pushes:
        await d.push(run_id, session)


# -- many processes, many sessions ------------------------------------------------------------------


async def test_three_dispatchers_run_each_run_once_in_order_without_overlap(env: Env) -> None:
    a, b = env.make("a"), env.make("b")
    c = env.make("c", max_sessions=4)  # also exercises the slot bound
    peak_c: list[int] = []
    for d in (a, b, c):
        d.start()
    n_sessions, per_session = 50, 20
    sessions = [f"agent:main:s{i}" for i in range(n_sessions)]
    expected = {s: [f"{s}/r{j}" for j in range(per_session)] for s in sessions}
    ds = [a, b, c]

    async def push_session(i: int, s: str) -> None:
        # One session's pushes are sequential (that is its order), rotating over the
        # three processes; the 50 sessions push concurrently.
        for j, run_id in enumerate(expected[s]):
            await ds[(i + j) % 3].push(run_id, s)
            peak_c.append(c.serving)

    await asyncio.gather(*(push_session(i, s) for i, s in enumerate(sessions)))
    await wait_until(lambda: len(env.executed) >= n_sessions * per_session, what="1,000 executions")
    await asyncio.sleep(0.05)  # a duplicate execution would show up here

    runs = [r for _, _, r in env.executed]
    assert len(runs) == 1000
    assert len(set(runs)) == 1000  # each run exactly once
    for s in sessions:
        assert env.runs_of(s) == expected[s]  # push order
    assert env.overlaps == []  # never two runs of one session at once, across processes
    assert env.orphaned == []
    assert sum(d.executed for d in ds) == 1000
    assert sum(d.pushed for d in ds) == 1000
    assert max(peak_c) <= 4

    for d in ds:
        await d.stop()
    # Everything drained and released: only the ready stream and the lease token counter are
    # left, and both expire.
    ttls = await env.ttls()
    assert sorted(ttls) == [f"{env.prefix}:fence", f"{env.prefix}:ready"]
    assert all(0 < ttl <= 7 * 86400 * 1000 for ttl in ttls.values())
    # Graceful stop left the consumer group and acked everything.
    assert await env.admin.xinfo_consumers(f"{env.prefix}:ready", GROUP) == []
    assert (await env.admin.xpending(f"{env.prefix}:ready", GROUP))["pending"] == 0


async def test_sessions_spread_over_processes_within_max_sessions(env: Env) -> None:
    # With one slot each, a process busy with one session reads no more messages, so
    # the other two sessions must be taken by the other two processes.
    ds = [env.make(n, max_sessions=1) for n in ("a", "b", "c")]
    for d in ds:
        d.start()
    gates = [blocked(env, f"first-{i}") for i in range(3)]
    for i in range(3):
        await ds[0].push(f"first-{i}", f"agent:main:w{i}")
        await ds[0].push(f"second-{i}", f"agent:main:w{i}")
    await wait_until(lambda: len(env.started) == 3, what="three sessions running at once")
    assert env.started == {"first-0", "first-1", "first-2"}
    assert [d.serving for d in ds] == [1, 1, 1]
    for g in gates:
        g.set()
    await wait_until(lambda: len(env.executed) == 6, what="all six runs")
    by_proc = {name for name, _, _ in env.executed}
    assert by_proc == {"a", "b", "c"}
    for i in range(3):
        assert env.runs_of(f"agent:main:w{i}") == [f"first-{i}", f"second-{i}"]
    for d in ds:
        await d.stop()


async def test_every_key_expires_while_a_session_is_busy(env: Env) -> None:
    d = env.make("a")
    d.start()
    gate = blocked(env, "r0")
    await push_all([(d, "r0", "agent:main:busy"), (d, "r1", "agent:main:busy"), (d, "r2", "agent:main:busy")])
    await wait_until(lambda: "r0" in env.started, what="r0 started")
    p = env.prefix
    ttls = await env.ttls()
    assert sorted(ttls) == sorted(
        [
            f"{p}:active",
            f"{p}:fence",
            f"{p}:lock:agent:main:busy",
            f"{p}:q:agent:main:busy",
            f"{p}:qp:agent:main:busy",
            f"{p}:ready",
        ]
    )
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    assert ttls[f"{p}:lock:agent:main:busy"] <= 10_000  # the lease
    assert 0 < ttls[f"{p}:q:agent:main:busy"] <= 86400 * 1000
    assert await env.admin.lrange(f"{p}:q:agent:main:busy", 0, -1) == [b"r1", b"r2"]
    assert await env.admin.lrange(f"{p}:qp:agent:main:busy", 0, -1) == [b"r0"]
    gate.set()
    await wait_until(lambda: len(env.executed) == 3, what="three runs")
    assert env.runs_of("agent:main:busy") == ["r0", "r1", "r2"]
    await wait_until(lambda: d.serving == 0, what="handler done")
    assert await env.keys() == [f"{p}:fence", f"{p}:ready"]
    await d.stop()


# -- crashes and stalls ---------------------------------------------------------------------------------


async def test_killed_holder_run_is_orphaned_and_the_rest_run_once_elsewhere(env: Env) -> None:
    a = env.make("a", lease_s=0.3, claim_idle_s=0.5)
    a.start()
    s = "agent:main:crash"
    blocked(env, "r0")  # never released: A is "executing" r0 when it dies
    await push_all([(a, f"r{i}", s) for i in range(5)])
    await wait_until(lambda: "r0" in env.started, what="A executing r0")
    await a.kill()
    assert env.executed == []
    assert await env.admin.lrange(f"{env.prefix}:qp:{s}", 0, -1) == [b"r0"]

    b = env.make("b", lease_s=0.3, claim_idle_s=0.5)
    b.start()
    await wait_until(lambda: len(env.executed) == 4, timeout=10, what="B drains the session")
    # The step after the last run (a Redis round trip) releases the lock and drops the queue.
    await wait_until(lambda: b.serving == 0, what="handler done")
    await asyncio.sleep(0.05)  # a duplicate execution or orphan report would show up here
    assert env.orphaned == [("b", s, "r0")]
    assert env.executed == [("b", s, f"r{i}") for i in range(1, 5)]
    assert (b.orphans, b.executed, a.executed) == (1, 4, 0)
    assert (
        await env.admin.exists(f"{env.prefix}:qp:{s}", f"{env.prefix}:q:{s}", f"{env.prefix}:lock:{s}") == 0
    )
    await b.stop()


async def test_expired_lease_alone_brings_the_session_back(env: Env) -> None:
    # A single run: the dead holder acked its only ready message when it took the lock,
    # so nothing is pending in the stream; the lease index alone must lead B there.
    a = env.make("a", lease_s=0.3, claim_idle_s=0.5)
    a.start()
    s = "agent:main:lonely"
    blocked(env, "only")
    await a.push("only", s)
    await wait_until(lambda: "only" in env.started, what="A executing")
    await a.kill()
    assert (await env.admin.xpending(f"{env.prefix}:ready", GROUP))["pending"] == 0

    b = env.make("b", lease_s=0.3, claim_idle_s=0.5)
    b.start()
    await wait_until(lambda: len(env.orphaned) == 1, timeout=10, what="the orphan report")
    assert env.orphaned == [("b", s, "only")]
    assert (b.recovered, b.claimed, b.executed) == (1, 0, 0)
    await wait_until(lambda: b.serving == 0, what="handler done")
    # lock, qp and lease index all gone
    assert await env.keys() == [f"{env.prefix}:fence", f"{env.prefix}:ready"]
    await b.stop()


async def test_messages_read_by_a_dead_consumer_are_claimed(env: Env) -> None:
    # A process that read ready messages and died before trying the lock: its entries
    # stay pending in the group until another consumer claims them.
    ready = f"{env.prefix}:ready"
    await env.admin.xgroup_create(ready, GROUP, id="0", mkstream=True)
    pusher = env.make("pusher")  # never started: only pushes
    s = "agent:main:ghosted"
    await push_all([(pusher, f"g{i}", s) for i in range(3)])
    got = await env.admin.xreadgroup(GROUP, "ghost", {ready: ">"}, count=10)
    assert len(got[0][1]) == 3

    b = env.make("b", lease_s=0.3, claim_idle_s=0.5)
    b.start()
    await wait_until(lambda: len(env.executed) == 3, timeout=10, what="claimed runs")
    assert env.runs_of(s) == ["g0", "g1", "g2"]
    assert b.claimed == 3
    assert env.orphaned == []
    await wait_until(lambda: b.serving == 0, what="handler done")
    assert (await env.admin.xpending(ready, GROUP))["pending"] == 0
    await b.stop()


async def test_stalled_holder_loses_its_lease_and_stops_executing(env: Env) -> None:
    # A stall longer than the lease is seen as a dead holder. Deleting the lock stands
    # for the lease running out while A was frozen. Whichever process takes the session
    # over (A itself may, for the messages it coalesced), r0 must not keep running.
    a = env.make("a", lease_s=0.3, claim_idle_s=0.5)
    b = env.make("b", lease_s=0.3, claim_idle_s=0.5)
    a.start()
    s = "agent:main:stall"
    blocked(env, "r0")
    await push_all([(a, "r0", s), (a, "r1", s), (a, "r2", s)])
    await wait_until(lambda: "r0" in env.started, what="A executing r0")
    b.start()
    await env.admin.delete(f"{env.prefix}:lock:{s}")

    await wait_until(lambda: len(env.executed) == 2, timeout=10, what="r1, r2 after the takeover")
    # A finds out on its next renewal (a Redis round trip every lease_s / 3), which the
    # takeover does not wait for.
    await wait_until(lambda: a.leases_lost >= 1 and a.interrupted >= 1, what="A losing its lease")
    await asyncio.sleep(0.05)  # a second loss or interruption would show up here
    assert a.leases_lost == 1
    assert a.interrupted == 1  # r0's execution on A was cancelled, not left running
    assert [o[2] for o in env.orphaned] == ["r0"]
    assert [r for _, _, r in env.executed] == ["r1", "r2"]
    assert env.overlaps == []
    for d in (a, b):
        await d.stop()


# -- stop -------------------------------------------------------------------------------------------


async def test_stop_lets_the_current_run_finish_and_hands_the_queue_off(env: Env) -> None:
    a = env.make("a")
    a.start()
    s = "agent:main:handoff"
    gate = blocked(env, "r0")
    await push_all([(a, "r0", s), (a, "r1", s), (a, "r2", s)])
    await wait_until(lambda: "r0" in env.started, what="A executing r0")
    stopping = asyncio.create_task(a.stop(grace_s=10))
    await asyncio.sleep(0.02)
    assert not stopping.done()  # waits for the execution in progress
    gate.set()
    await stopping
    assert a.executed == 1 and a.interrupted == 0
    assert [r for _, _, r in env.executed] == ["r0"]
    p = env.prefix
    assert await env.admin.exists(f"{p}:lock:{s}", f"{p}:qp:{s}", f"{p}:active") == 0
    assert await env.admin.lrange(f"{p}:q:{s}", 0, -1) == [b"r1", b"r2"]
    assert await env.admin.xinfo_consumers(f"{p}:ready", GROUP) == []

    b = env.make("b")
    b.start()  # picks up the hand-off message at once, no lease to wait for
    await wait_until(lambda: len(env.executed) == 3, timeout=5, what="B runs the rest")
    assert [r for _, _, r in env.executed] == ["r0", "r1", "r2"]
    assert env.orphaned == []
    await b.stop()


async def test_stop_cancels_after_the_grace_and_the_run_becomes_an_orphan(env: Env) -> None:
    a = env.make("a")
    a.start()
    s = "agent:main:slow"
    blocked(env, "r0")
    await push_all([(a, "r0", s), (a, "r1", s)])
    await wait_until(lambda: "r0" in env.started, what="A executing r0")
    await a.stop(grace_s=0.05)
    assert (a.executed, a.interrupted) == (0, 1)
    p = env.prefix
    assert await env.admin.exists(f"{p}:lock:{s}") == 0
    assert await env.admin.lrange(f"{p}:qp:{s}", 0, -1) == [b"r0"]

    b = env.make("b")
    b.start()
    await wait_until(lambda: len(env.executed) == 1, timeout=5, what="B runs r1")
    assert env.orphaned == [("b", s, "r0")]
    assert [r for _, _, r in env.executed] == ["r1"]
    await b.stop()


async def test_execute_that_raises_is_logged_and_the_session_goes_on(env: Env) -> None:
    seen: list[str] = []

    async def execute(run_id: str, session: str) -> None:
        seen.append(run_id)
        if run_id == "bad":
            raise RuntimeError("boom")

    async def on_orphan(run_id: str, session: str) -> None:
        raise AssertionError("no orphan expected")

    client = aioredis.from_url(env.url, socket_timeout=10)
    env.clients.append(client)
    d = RedisDispatcher(client, prefix=env.prefix, consumer="x", execute=execute, on_orphan=on_orphan)
    env.dispatchers.append(d)
    d.start()
    for r in ("ok1", "bad", "ok2"):
        await d.push(r, "agent:main:e")
    await wait_until(lambda: len(seen) == 3, what="three executions")
    assert seen == ["ok1", "bad", "ok2"]
    assert (d.executed, d.execute_errors) == (3, 1)
    await d.stop()


class _BuggyOnce(aioredis.Redis):
    """The Redis client with a bug in its first XREADGROUP: not a RedisError (an outage) but
    an exception nothing expects, so the supervisor counts it."""

    raised = False

    async def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        if not self.raised:
            self.raised = True
            raise RuntimeError("client bug")
        return await super().xreadgroup(*args, **kwargs)


async def test_a_bug_in_a_dispatcher_loop_is_counted_and_the_loop_runs_again(env: Env) -> None:
    seen: list[str] = []

    async def execute(run_id: str, session: str) -> None:
        seen.append(run_id)

    async def on_orphan(run_id: str, session: str) -> None:
        raise AssertionError("no orphan expected")

    client = _BuggyOnce.from_url(env.url, socket_timeout=10)
    env.clients.append(client)
    sup = Supervisor()
    d = RedisDispatcher(
        client, prefix=env.prefix, consumer="x", execute=execute, on_orphan=on_orphan, tasks=sup
    )
    env.dispatchers.append(d)
    d.start()
    assert sup.describe()["loops"] == ["dispatch-claim", "dispatch-read", "dispatch-renew"]
    await d.push("r1", "agent:main:bug")
    await wait_until(lambda: seen == ["r1"], what="the run, once the read loop ran again")
    assert client.raised
    assert sup.errors == {"dispatch-read": 1}
    await d.stop()
    assert sup.describe()["loops"] == []
