"""One contract suite for every Store backend: SQLite (embedded) and Redis (shared).

The Redis parameter needs a server at CLAWGATE_TEST_REDIS_URL (default
redis://127.0.0.1:6379/0) and is skipped, with the reason, when none answers.
Each Redis test works under its own key prefix and deletes its keys after.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from clawgate.errors import StoreError
from clawgate.store.base import SessionGate, Store
from clawgate.store.records import RunRecord, SessionMeta, SubagentRecord, TranscriptMessage
from clawgate.store.redis_store import RedisStore
from clawgate.store.sqlite import SqliteStore
from clawgate.testing.redis import drop_redis_prefix

REDIS_URL = os.environ.get("CLAWGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def _redis_unavailable() -> str | None:
    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await asyncio.wait_for(client.ping(), 2)
    except (RedisError, OSError, TimeoutError) as exc:
        return f"no Redis at {REDIS_URL} (set CLAWGATE_TEST_REDIS_URL): {type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
    return None


async def _redis_keys(prefix: str) -> list[bytes]:
    client = aioredis.from_url(REDIS_URL)
    try:
        return [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
    finally:
        await client.aclose()


async def _redis_cleanup(prefix: str) -> None:
    await drop_redis_prefix(REDIS_URL, prefix)


@contextlib.asynccontextmanager
async def _redis_store() -> AsyncIterator[RedisStore]:
    reason = await _redis_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"cgtest:{uuid.uuid4().hex}"
    s = RedisStore(REDIS_URL, prefix=prefix)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
        await _redis_cleanup(prefix)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "redis":
        async with _redis_store() as rs:
            yield rs
        return
    s = SqliteStore(tmp_path / "s.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    async with _redis_store() as rs:
        yield rs


def _session(key: str, t: float, **kw: Any) -> SessionMeta:
    return SessionMeta(key=key, session_id=f"sid-{key}-{t}", created_at=t, updated_at=t, **kw)


def _run(run_id: str, session_key: str = "agent:main:main", message: str = "hi", **kw: Any) -> RunRecord:
    return RunRecord(run_id=run_id, session_key=session_key, agent_id="main", message=message, **kw)


def _sub(run_id: str, requester: str, t: float, **kw: Any) -> SubagentRecord:
    return SubagentRecord(
        run_id=run_id,
        child_session_key=f"agent:main:subagent:{run_id}",
        requester_session_key=requester,
        task="do it",
        created_at=t,
        **kw,
    )


# -- lifecycle -----------------------------------------------------------------------------------------


async def test_ping_and_idempotent_close(store: Store) -> None:
    assert await store.ping() is True
    await store.close()
    await store.close()
    assert await store.ping() is False
    with pytest.raises(StoreError):
        await store.put_session(_session("agent:main:x", time.time()))


async def test_unawaited_failed_write_is_not_reported_as_never_retrieved(store: Store) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    # Garbage of earlier tests (a task whose exception nobody read) is reported when it is
    # collected: collect it before listening, so only what this test leaves counts.
    gc.collect()
    await asyncio.sleep(0)
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        await store.close()
        store.put_session(_session("agent:main:x", time.time()))  # fails: closed; nobody awaits it
        store.append_message(TranscriptMessage(session_key="agent:main:x", role="user", content="a", ts=1.0))
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


async def test_reads_see_unawaited_writes_enqueued_before(store: Store) -> None:
    t = time.time()
    store.put_session(_session("agent:main:a", t))
    store.append_message(TranscriptMessage(session_key="agent:main:a", role="user", content="x", ts=t))
    store.put_run(_run("r1", "agent:main:a"))
    got = await store.get_session("agent:main:a")
    assert got is not None and got.session_id == f"sid-agent:main:a-{t}"
    assert [m.content for m in await store.history("agent:main:a", 10)] == ["x"]
    assert await store.get_run("r1") is not None


async def test_barrier_and_flush_cover_earlier_writes(store: Store) -> None:
    t = time.time()
    futs = [store.put_session(_session(f"agent:main:s{i}", t + i)) for i in range(50)]
    await store.barrier()
    assert all(asyncio.ensure_future(f).done() for f in futs)
    store.put_session(_session("agent:main:last", t + 100))
    await store.flush()
    assert await store.get_session("agent:main:last") is not None


# -- sessions ----------------------------------------------------------------------------------------


async def test_session_put_get_update(store: Store) -> None:
    t = time.time()
    assert await store.get_session("agent:main:a") is None
    await store.put_session(_session("agent:main:a", t, label="first", model="m1", kind="main"))
    got = await store.get_session("agent:main:a")
    assert got == _session("agent:main:a", t, label="first", model="m1")

    # An update keeps created_at and clears fields set to None.
    await store.put_session(
        SessionMeta(
            key="agent:main:a", session_id="sid-2", created_at=t + 50, updated_at=t + 5, agent_id="ops"
        )
    )
    got = await store.get_session("agent:main:a")
    assert got == SessionMeta(
        key="agent:main:a", session_id="sid-2", created_at=t, updated_at=t + 5, agent_id="ops"
    )


async def test_list_sessions_order_limit_prefix_since(store: Store) -> None:
    t = time.time()
    keys = ["agent:main:a", "agent:main:b", "agent:ops:c", "agent:main:d", "agent:ops:e"]
    for i, key in enumerate(keys):
        store.put_session(_session(key, t + i))
    await store.barrier()

    assert [s.key for s in await store.list_sessions(limit=10)] == list(reversed(keys))
    assert [s.key for s in await store.list_sessions(limit=2)] == ["agent:ops:e", "agent:main:d"]
    assert [s.key for s in await store.list_sessions(limit=10, prefix="agent:main:")] == [
        "agent:main:d",
        "agent:main:b",
        "agent:main:a",
    ]
    assert [s.key for s in await store.list_sessions(limit=1, prefix="agent:main:")] == ["agent:main:d"]
    assert [s.key for s in await store.list_sessions(limit=10, updated_since=t + 2)] == [
        "agent:ops:e",
        "agent:main:d",
        "agent:ops:c",
    ]
    assert [s.key for s in await store.list_sessions(limit=10, updated_since=t + 2, prefix="agent:ops:")] == [
        "agent:ops:e",
        "agent:ops:c",
    ]
    assert await store.list_sessions(limit=10, prefix="agent:nobody:") == []

    # Touching a session moves it to the front.
    await store.put_session(_session("agent:main:a", t + 10))
    assert (await store.list_sessions(limit=1))[0].key == "agent:main:a"


async def test_delete_session_removes_transcript_and_listing(store: Store) -> None:
    t = time.time()
    store.put_session(_session("agent:main:a", t))
    store.put_session(_session("agent:main:b", t + 1))
    store.append_message(TranscriptMessage(session_key="agent:main:a", role="user", content="x", ts=t))
    await store.delete_session("agent:main:a")
    assert await store.get_session("agent:main:a") is None
    assert await store.history("agent:main:a", 10) == []
    assert [s.key for s in await store.list_sessions(limit=10)] == ["agent:main:b"]
    await store.delete_session("agent:main:missing")  # a no-op, not an error


async def test_reset_session(store: Store) -> None:
    t = time.time()
    await store.put_session(_session("agent:main:a", t, label="keep"))
    for i in range(3):
        store.append_message(TranscriptMessage(session_key="agent:main:a", role="user", content=str(i), ts=t))
    await store.reset_session("agent:main:a", "sid-new", t + 7)
    got = await store.get_session("agent:main:a")
    assert got == SessionMeta(
        key="agent:main:a", session_id="sid-new", created_at=t, updated_at=t + 7, label="keep"
    )
    assert await store.history("agent:main:a", 10) == []
    assert (await store.list_sessions(limit=1, updated_since=t + 7))[0].key == "agent:main:a"

    # Resetting an unknown session creates nothing.
    await store.reset_session("agent:main:ghost", "sid-x", t + 8)
    assert await store.get_session("agent:main:ghost") is None
    assert [s.key for s in await store.list_sessions(limit=10)] == ["agent:main:a"]


# -- transcripts ----------------------------------------------------------------------------------------


async def test_transcript_order_and_limit(store: Store) -> None:
    t = time.time()
    for i in range(5):
        store.append_message(
            TranscriptMessage(
                session_key="agent:main:a",
                role="user" if i % 2 == 0 else "assistant",
                content=f"m{i}",
                ts=t + i,
                run_id="r1" if i == 4 else None,
            )
        )
    store.append_message(TranscriptMessage(session_key="agent:main:b", role="user", content="other", ts=t))
    await store.barrier()

    full = await store.history("agent:main:a", 100)
    assert [m.content for m in full] == ["m0", "m1", "m2", "m3", "m4"]
    assert full[4] == TranscriptMessage(
        session_key="agent:main:a", role="user", content="m4", ts=t + 4, run_id="r1"
    )
    assert [m.content for m in await store.history("agent:main:a", 3)] == ["m2", "m3", "m4"]
    assert [m.content for m in await store.history("agent:main:a", 1)] == ["m4"]
    assert await store.history("agent:main:a", 0) == []
    assert [m.content for m in await store.history("agent:main:b", 10)] == ["other"]
    assert await store.history("agent:main:none", 10) == []


# -- runs ------------------------------------------------------------------------------------------------


async def test_runs_lifecycle_and_counts(store: Store) -> None:
    t = time.time()
    assert await store.get_run("nope") is None
    assert await store.count_runs() == 0
    store.put_run(_run("r1", "agent:main:a", accepted_at=t))
    store.put_run(_run("r2", "agent:main:a", accepted_at=t + 1))
    store.put_run(_run("r3", "agent:main:b", accepted_at=t + 2))
    await store.barrier()

    assert {r.run_id for r in await store.unfinished_runs()} == {"r1", "r2", "r3"}
    assert await store.count_runs() == 3
    assert await store.count_runs("agent:main:a") == 2
    assert await store.count_runs("agent:main:b") == 1
    assert await store.count_runs("agent:main:none") == 0

    await store.put_run(_run("r1", "agent:main:a", accepted_at=t, status="running", started_at=t + 0.5))
    done = _run(
        "r2",
        "agent:main:a",
        accepted_at=t + 1,
        status="ok",
        started_at=t + 1,
        ended_at=t + 3,
        result_text="done",
        duration_ms=2000,
    )
    await store.put_run(done)
    assert await store.get_run("r2") == done
    running = await store.get_run("r1")
    assert running is not None and running.status == "running" and not running.is_final
    assert {r.run_id for r in await store.unfinished_runs()} == {"r1", "r3"}
    # Finished runs still count until swept or expired.
    assert await store.count_runs() == 3
    assert await store.count_runs("agent:main:a") == 2


async def test_sweep_runs(store: Store) -> None:
    t = time.time()
    store.put_run(_run("old", status="error", ended_at=t - 100, error="boom"))
    store.put_run(_run("new", status="ok", ended_at=t))
    store.put_run(_run("open", status="running"))
    await store.barrier()
    assert await store.sweep_runs(t - 50) == 1
    assert await store.get_run("old") is None
    assert await store.get_run("new") is not None
    assert await store.get_run("open") is not None
    assert await store.count_runs() == 2
    assert await store.count_runs("agent:main:main") == 2
    assert await store.sweep_runs(t - 50) == 0
    assert await store.sweep_runs(t + 1) == 1
    assert [r.run_id for r in await store.unfinished_runs()] == ["open"]


async def test_create_run_is_atomic_with_the_idempotency_check(store: Store) -> None:
    t = time.time()
    first = _run("r1", "agent:main:a", accepted_at=t)
    assert await store.create_run(first, reuse_after_s=60, now=t) is None
    assert await store.get_run("r1") == first
    assert [r.run_id for r in await store.unfinished_runs()] == ["r1"]
    assert await store.count_runs("agent:main:a") == 1

    # Unfinished: the existing record comes back and nothing is written.
    again = _run("r1", "agent:main:a", accepted_at=t + 1000, message="other")
    assert await store.create_run(again, reuse_after_s=60, now=t + 1000) == first
    assert await store.get_run("r1") == first

    # Finished recently: still the existing record.
    done = _run("r1", "agent:main:a", accepted_at=t, status="ok", ended_at=t + 1, result_text="x")
    await store.put_run(done)
    assert await store.create_run(again, reuse_after_s=60, now=t + 30) == done
    assert await store.get_run("r1") == done

    # Finished long ago: replaced.
    assert await store.create_run(again, reuse_after_s=60, now=t + 1000) is None
    assert await store.get_run("r1") == again
    assert [r.run_id for r in await store.unfinished_runs()] == ["r1"]
    assert await store.count_runs("agent:main:a") == 1


class _Refused(Exception):
    pass


def _past_budget() -> SessionGate:
    return SessionGate(
        refuses=lambda meta: bool(meta.budget_tokens) and meta.tokens_used >= (meta.budget_tokens or 0),
        refusal=lambda meta: _Refused(f"{meta.key}: {meta.tokens_used} of {meta.budget_tokens}"),
    )


async def test_create_run_checks_the_sessions_stored_record_with_the_insert(store: Store) -> None:
    """A gate sees the session as stored (not a cached copy) and, when it refuses, nothing is
    written; a session the store does not have is not checked."""
    t = time.time()
    gate = _past_budget()
    assert (
        await store.create_run(
            _run("new", "agent:main:none", accepted_at=t), reuse_after_s=60, now=t, gate=gate
        )
        is None
    )
    key = "agent:main:budgeted"
    await store.put_session(_session(key, t, budget_tokens=10))
    assert (
        await store.create_run(_run("under", key, accepted_at=t), reuse_after_s=60, now=t, gate=gate) is None
    )
    await store.add_session_tokens(key, 10)
    with pytest.raises(_Refused, match="10 of 10"):
        await store.create_run(_run("over", key, accepted_at=t), reuse_after_s=60, now=t, gate=gate)
    assert await store.get_run("over") is None
    assert sorted(r.run_id for r in await store.unfinished_runs()) == ["new", "under"]
    # Without a gate the same run is inserted: the check is the caller's choice.
    assert await store.create_run(_run("over", key, accepted_at=t), reuse_after_s=60, now=t) is None
    # A retry of a run already inserted joins it before any check: an accepted run stays accepted.
    assert (
        await store.create_run(_run("under", key, accepted_at=t), reuse_after_s=60, now=t, gate=gate)
        is not None
    )


async def test_create_run_concurrent_exactly_one_inserts(store: Store) -> None:
    t = time.time()
    recs = [_run("same", "agent:main:a", accepted_at=t, message=f"m{i}") for i in range(20)]
    results = await asyncio.gather(*(store.create_run(r, reuse_after_s=60, now=t) for r in recs))
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(r == recs[winners[0]] for r in results if r is not None)
    assert await store.get_run("same") == recs[winners[0]]


# -- idempotency ------------------------------------------------------------------------------------------


async def test_claim_key_exactly_one_wins(store: Store) -> None:
    now = time.time()
    results = await asyncio.gather(*(store.claim_key("idem-1", f"run-{i}", 60, now) for i in range(25)))
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    winner = f"run-{winners[0]}"
    assert all(r == winner for r in results if r is not None)
    assert await store.claim_key("idem-1", "late", 60, now) == winner
    assert await store.claim_key("idem-2", "late", 60, now) is None


async def test_claim_key_expires(store: Store) -> None:
    now = time.time()
    # Redis expires the key on its own clock (PX), in real time: a TTL that the next claim
    # surely comes within on a loaded machine, then a bounded poll for its expiry.
    redis = isinstance(store, RedisStore)
    ttl = 1.0 if redis else 0.2
    assert await store.claim_key("idem-x", "run-a", ttl, now) is None
    assert await store.claim_key("idem-x", "run-b", ttl, now) == "run-a"
    if redis:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        # Observes Redis' native PX expiry: held by run-a until then, then claimed by run-c.
        while (holder := await store.claim_key("idem-x", "run-c", ttl, time.time())) is not None:
            assert holder == "run-a"
            assert loop.time() < deadline, "the claim never expired"
            await asyncio.sleep(0.05)
        later = time.time()
    else:
        later = now + 0.3
        assert await store.claim_key("idem-x", "run-c", ttl, later) is None
    assert await store.claim_key("idem-x", "run-d", ttl, later) == "run-c"


# -- subagents ---------------------------------------------------------------------------------------------


async def test_subagent_registry(store: Store) -> None:
    t = time.time()
    assert await store.get_subagent("s0") is None
    assert await store.count_subagents() == 0
    store.put_subagent(_sub("s1", "agent:main:a", t))
    store.put_subagent(_sub("s2", "agent:main:b", t + 1))
    store.put_subagent(_sub("s3", "agent:main:a", t + 2, label="third"))
    await store.barrier()

    assert await store.get_subagent("s3") == _sub("s3", "agent:main:a", t + 2, label="third")
    assert await store.count_subagents() == 3
    assert [r.run_id for r in await store.list_subagents(None, 10)] == ["s3", "s2", "s1"]
    assert [r.run_id for r in await store.list_subagents(None, 2)] == ["s3", "s2"]
    assert [r.run_id for r in await store.list_subagents("agent:main:a", 10)] == ["s3", "s1"]
    assert [r.run_id for r in await store.list_subagents("agent:main:a", 1)] == ["s3"]
    assert await store.list_subagents("agent:main:none", 10) == []
    assert {r.run_id for r in await store.live_subagents()} == {"s1", "s2", "s3"}

    # An update keeps the listing order; cleanup done but ended hook undelivered is still live.
    ended = _sub(
        "s1", "agent:main:a", t, status="ended", outcome="ok", ended_at=t + 5, cleanup_completed_at=t + 6
    )
    await store.put_subagent(ended)
    assert await store.get_subagent("s1") == ended
    assert [r.run_id for r in await store.list_subagents(None, 10)] == ["s3", "s2", "s1"]
    assert {r.run_id for r in await store.live_subagents()} == {"s1", "s2", "s3"}

    # Cleanup completed and ended hook delivered: no longer live; expires_at makes it due.
    gone = _sub(
        "s1",
        "agent:main:a",
        t,
        status="ended",
        outcome="ok",
        ended_at=t + 5,
        cleanup_completed_at=t + 6,
        ended_notified=True,
        expires_at=t + 60,
    )
    store.put_subagent(gone)
    store.put_subagent(_sub("s2", "agent:main:b", t + 1, expires_at=t + 30, cleanup_completed_at=t + 7))
    await store.barrier()
    assert {r.run_id for r in await store.live_subagents()} == {"s2", "s3"}
    assert await store.due_subagents(t + 10, 10) == []
    assert [r.run_id for r in await store.due_subagents(t + 40, 10)] == ["s2"]
    assert [r.run_id for r in await store.due_subagents(t + 100, 10)] == ["s2", "s1"]
    assert [r.run_id for r in await store.due_subagents(t + 100, 1)] == ["s2"]

    await store.delete_subagent("s2")
    assert await store.get_subagent("s2") is None
    assert await store.count_subagents() == 2
    assert [r.run_id for r in await store.due_subagents(t + 100, 10)] == ["s1"]
    assert {r.run_id for r in await store.live_subagents()} == {"s3"}
    assert [r.run_id for r in await store.list_subagents(None, 10)] == ["s3", "s1"]
    assert await store.list_subagents("agent:main:b", 10) == []
    await store.delete_subagent("s2")  # again: a no-op

    # Clearing expires_at takes a record off the due list.
    store.put_subagent(_sub("s1", "agent:main:a", t, cleanup_completed_at=t + 6, ended_notified=True))
    assert await store.due_subagents(t + 100, 10) == []


# -- Redis only ----------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_every_key_expires(redis_store: RedisStore) -> None:
    s = redis_store
    t = time.time()
    for i in range(3):
        s.put_session(_session(f"agent:main:s{i}", t + i, label="l"))
        s.append_message(TranscriptMessage(session_key=f"agent:main:s{i}", role="user", content="x", ts=t))
    s.append_message(TranscriptMessage(session_key="agent:main:orphan", role="user", content="x", ts=t))
    s.reset_session("agent:main:s1", "new", t + 9)
    s.delete_session("agent:main:s2")
    await s.create_run(_run("r0", "agent:main:s0"), reuse_after_s=60, now=t)
    s.put_run(_run("r1", "agent:main:s0"))
    s.put_run(_run("r2", "agent:main:s0", status="running"))
    s.put_run(_run("r3", "agent:main:s1", status="ok", ended_at=t))
    s.put_run(_run("r4", "agent:main:s1", status="aborted", ended_at=t - 100))
    s.put_subagent(_sub("a1", "agent:main:s0", t))
    s.put_subagent(_sub("a2", "agent:main:s0", t, expires_at=t + 60))
    s.put_subagent(
        _sub("a3", "agent:main:s1", t, expires_at=t - 60, cleanup_completed_at=t, ended_notified=True)
    )
    s.delete_subagent("a1")
    await s.barrier()
    await s.claim_key("k1", "r1", 60, t)
    await s.sweep_runs(t - 50)
    await s.list_sessions(limit=10)
    await s.unfinished_runs()
    await s.live_subagents()
    await s.due_subagents(t + 100, 10)
    await s.list_subagents(None, 10)
    await s.barrier()

    keys = await _redis_keys(s.prefix)
    assert len(keys) >= 15
    client = aioredis.from_url(REDIS_URL)
    try:
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.pttl(k)
        ttls = dict(zip(keys, await pipe.execute(), strict=True))
    finally:
        await client.aclose()
    persistent = sorted(k.decode() for k, ttl in ttls.items() if ttl == -1)
    assert persistent == []
    # Finished run results expire after run_result_ttl_s, open ones much later.
    assert 0 < ttls[s.keys.run("r3").encode()] <= s.run_result_ttl_s * 1000
    assert ttls[s.keys.run("r1").encode()] > s.run_result_ttl_s * 1000


async def test_redis_down_open_raises_and_ping_is_false() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="cgtest:down")
    with pytest.raises(StoreError):
        await s.open()
    assert await s.ping() is False
    await s.close()
    await s.close()
