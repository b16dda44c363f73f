"""Retention means the same on SQLite and Redis: the store methods it drives, checked on both
(real file, real Redis with a private prefix), a gateway on Redis, and the CI-sized proof
that a batch of 20,000 runs with unique session keys leaves the store back at its baseline
after one retention period, on both stores."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from clawgate.client import Client
from clawgate.ids import RunId, SessionKey
from clawgate.retention import policy
from clawgate.runs.service import SubmitRequest
from clawgate.server.gateway import Gateway, open_store
from clawgate.server.serve import RunningGateway
from clawgate.settings import Settings, parse_settings
from clawgate.state.clock import FakeClock
from clawgate.store.base import Store
from clawgate.store.records import RunRecord, SessionMeta, TranscriptMessage
from clawgate.store.redis_store import RedisStore
from clawgate.store.sqlite import SqliteStore
from clawgate.testing import GatewayProcess
from clawgate.testing.redis import drop_redis_prefix
from conftest import REDIS_URL, unique_prefix

QUIET = {"maintenance_interval_s": 10**8, "disk_free_min_bytes": 0}
ADMIN = ["operator.read", "operator.write", "operator.admin"]


async def _redis_or_skip() -> None:
    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    finally:
        await client.aclose()


async def _drop_prefix(prefix: str) -> None:
    await drop_redis_prefix(REDIS_URL, prefix)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    prefix = unique_prefix()
    if request.param == "redis":
        await _redis_or_skip()
        s = RedisStore(REDIS_URL, prefix=prefix)
    else:
        s = SqliteStore(tmp_path / "s.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()
        if request.param == "redis":
            await _drop_prefix(prefix)


def _session(key: str, t: float) -> SessionMeta:
    return SessionMeta(key=key, session_id=uuid.uuid4().hex, created_at=t, updated_at=t)


def _msg(key: str, content: str, t: float = 1.0) -> TranscriptMessage:
    return TranscriptMessage(session_key=key, role="user", content=content, ts=t)


async def test_idle_and_lru_candidates_and_the_guarded_delete(store: Store) -> None:
    for i in range(5):
        store.put_session(_session(f"agent:main:s{i}", 100.0 + i))
        store.append_message(_msg(f"agent:main:s{i}", "hello"))
    assert await store.count_sessions() == 5
    stale = await store.stale_sessions(102.0, 10)
    assert stale == [("agent:main:s0", 100.0), ("agent:main:s1", 101.0)]
    assert [k for k, _ in await store.oldest_sessions(3)] == [
        "agent:main:s0",
        "agent:main:s1",
        "agent:main:s2",
    ]

    # s1 is used again after it was read: the delete keeps it.
    store.put_session(_session("agent:main:s1", 200.0))
    assert await store.delete_sessions_if_idle(stale, dry_run=True) == ["agent:main:s0"]
    assert await store.count_sessions() == 5
    assert await store.delete_sessions_if_idle(stale) == ["agent:main:s0"]
    assert await store.get_session("agent:main:s0") is None
    assert await store.history("agent:main:s0", 10) == []
    assert await store.get_session("agent:main:s1") is not None
    assert (await store.table_rows())["sessions"] == 4
    assert (await store.table_rows())["messages"] == 4


async def test_transcript_trim_counts_what_it_dropped_and_reset_clears_it(store: Store) -> None:
    key = "agent:main:t"
    store.put_session(_session(key, 1.0))
    for i in range(10):
        store.append_message(_msg(key, f"m{i}" + "é" * 50, float(i)))  # 2-byte characters
    assert await store.trim_transcripts([key], 6, 10_000, dry_run=True) == 4
    assert await store.transcript_dropped(key) == 0
    assert await store.trim_transcripts([key], 6, 10_000) == 4
    assert [m.content[:2] for m in await store.history(key, 100)] == ["m4", "m5", "m6", "m7", "m8", "m9"]
    # Bytes are bytes of content (UTF-8), the same on both stores: 3 messages of 102 bytes fit 320.
    assert await store.trim_transcripts([key], 100, 320) == 3
    assert len(await store.history(key, 100)) == 3
    assert await store.transcript_dropped(key) == 7
    assert key in await store.oversized_transcripts(2, 10_000, 100)
    await store.reset_session(key, "new", 5.0)
    assert await store.transcript_dropped(key) == 0


async def test_finished_runs_by_count_and_age(store: Store) -> None:
    for i in range(6):
        rec = RunRecord(run_id=f"r{i}", session_key="agent:main:r", agent_id="main", message="m")
        rec.status, rec.ended_at = "ok", 100.0 + i
        store.put_run(rec)
    store.put_run(RunRecord(run_id="open", session_key="agent:main:r", agent_id="main", message="m"))
    assert await store.count_finished_runs_before(102.0) == 3
    assert await store.prune_finished_runs(4, dry_run=True) == 2
    assert await store.prune_finished_runs(4) == 2
    assert [await store.get_run(f"r{i}") is not None for i in range(6)] == [False] * 2 + [True] * 4
    assert await store.get_run("open") is not None
    assert await store.store_bytes() > 0


async def test_a_gateway_on_redis_applies_the_same_rules(
    tmp_path: Path, clock: FakeClock, redis_url: str
) -> None:
    prefix = unique_prefix()
    settings = parse_settings(
        {
            "state_dir": str(tmp_path / "state"),
            "port": 0,
            "log_level": "warning",
            "store": redis_url,
            "redis_prefix": prefix,
            "session_idle_ttl_s": 100,
            "session_max_messages": 2,
            **QUIET,
        }
    )
    # The store is given (runs go through this process' lanes): an in-process gateway in
    # cluster mode makes pytest's hypothesis plugin fail at session end on this Python.
    rg = RunningGateway(Gateway(settings, clock=clock, store=open_store(settings)))
    await rg.__aenter__()
    try:
        gw = rg.gateway
        async with Client(rg.url, max_reconnect_attempts=0) as c:
            await c.run_agent("[[reply:a]]", session_key="agent:main:old")
            clock.advance(101)
            for _ in range(2):
                await c.run_agent("[[reply:b]]", session_key="agent:main:new")
            await gw.store.flush()
            report = await gw.retention.run()
            hist = await c.call("chat.history", {"sessionKey": "agent:main:new"})
        assert report[policy.SESSION_IDLE] == 1 and report[policy.TRANSCRIPT] == 2
        assert hist["truncated"] is True and len(hist["messages"]) == 2
        assert [m.key for m in await gw.store.list_sessions(limit=10)] == ["agent:main:new"]
        # Redis' own expiry is a backstop past the idle TTL, no longer a fixed 30 days.
        assert isinstance(gw.store, RedisStore)
        ttl_ms = await gw.store._submit([("PTTL", f"{prefix}:session:agent:main:new")], lambda r: int(r[0]))
        assert (100 + 86400 - 60) * 1000 < ttl_ms <= (100 + 86400) * 1000
    finally:
        await rg.stop()
        await _drop_prefix(prefix)


@pytest.mark.redis
async def test_a_reply_written_by_a_fenced_end_counts_toward_the_transcript_bound(
    tmp_path: Path, redis_url: str
) -> None:
    """On the shared Redis queue a run's reply is written by its end's own script, not by an
    append: that write marks the transcript for the next retention pass too. A pass runs
    while the run is in flight (the question marked the transcript); the reply lands after
    it, and the next pass must still trim it."""
    await _redis_or_skip()
    prefix = unique_prefix()
    gp = GatewayProcess(
        tmp_path / "gw",
        settings={"store": redis_url, "redis_prefix": prefix, "session_max_messages": 2, **QUIET},
        args=["--log-level", "warning"],
        log_path=tmp_path / "gw.log",
    )
    await gp.astart()
    key = "agent:main:fenced"
    try:
        async with Client(gp.url, max_reconnect_attempts=0, scopes=ADMIN) as c:
            await c.run_agent("[[reply:first]]", session_key=key)
            slow = asyncio.create_task(c.run_agent("[[delay:1]] second", session_key=key))
            for _ in range(500):
                if (await c.status())["runs"]["active"]:
                    break
                await asyncio.sleep(0.01)
            first_pass = await c.call("sessions.cleanup", {})
            assert first_pass["removed"]["transcript_messages"] == 1  # 3 messages, bound 2
            assert (await slow)["status"] == "ok"
            assert len((await c.call("chat.history", {"sessionKey": key}))["messages"]) == 3
            second_pass = await c.call("sessions.cleanup", {})
            assert second_pass["removed"]["transcript_messages"] == 1
            messages = (await c.call("chat.history", {"sessionKey": key}))["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[-1]["content"].endswith("second")
    finally:
        await asyncio.to_thread(gp.stop)
        await _drop_prefix(prefix)


# -- the CI-sized proof -------------------------------------------------------------------------------

RUNS = 20_000
WAVE = 2000


async def _batch(gw: Gateway, start: int, n: int) -> None:
    """`n` runs, each in a session of its own (a batch without session keys), in waves."""
    for lo in range(start, start + n, WAVE):
        runs = []
        for i in range(lo, min(lo + WAVE, start + n)):
            await gw.runs.submit(
                SubmitRequest(
                    run_id=RunId(f"batch-{i}"),
                    session_key=SessionKey(f"agent:main:batch-{i}"),
                    agent_id="main",
                    message=f"[[reply:result {i}]]",
                )
            )
            runs.append(f"batch-{i}")
        for run_id in runs:
            rec = await gw.runs.wait(RunId(run_id), 60)
            assert rec is not None and rec.status == "ok"
    await gw.store.flush()


async def _disk(gw: Gateway) -> tuple[dict[str, int], int]:
    await gw.store.flush()
    return await gw.store.table_rows(), await gw.store.store_bytes()


async def _soak(gw: Gateway, clock: FakeClock) -> dict[str, Any]:
    period = gw.settings.session_idle_ttl_s
    await gw.retention.run()
    base_rows, base_bytes = await _disk(gw)
    await _batch(gw, 0, RUNS)
    peak_rows, peak_bytes = await _disk(gw)
    clock.advance(period + 1)
    await gw.maintenance.run_once()
    end_rows, end_bytes = await _disk(gw)
    return {
        "base": (base_rows, base_bytes),
        "peak": (peak_rows, peak_bytes),
        "end": (end_rows, end_bytes),
    }


def _soak_settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "log_level": "warning",
        "session_idle_ttl_s": 600,
        "run_retention_s": 600,
        "main_concurrency": 256,
        **QUIET,
    }
    return parse_settings({**base, **kw})


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_twenty_thousand_runs_leave_sqlite_at_its_baseline(tmp_path: Path, clock: FakeClock) -> None:
    gw = Gateway(_soak_settings(tmp_path), clock=clock)
    await gw.start()
    try:
        seen = await _soak(gw, clock)
    finally:
        await gw.stop()
    (base_rows, base_bytes), (peak_rows, peak_bytes), (end_rows, end_bytes) = (
        seen["base"],
        seen["peak"],
        seen["end"],
    )
    assert peak_rows["sessions"] == RUNS and peak_rows["messages"] == 2 * RUNS and peak_rows["runs"] == RUNS
    assert end_rows == base_rows == {"sessions": 0, "messages": 0, "runs": 0, "subagents": 0}
    assert peak_bytes > 4 * base_bytes
    # Pages are given back: the file is back within a few pages of the empty store.
    assert end_bytes <= base_bytes + 64 * 1024, seen


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(900)  # about 90 s on a loaded 2-core machine: the runs, not retention
async def test_twenty_thousand_runs_leave_redis_at_its_baseline(
    tmp_path: Path, clock: FakeClock, redis_url: str
) -> None:
    prefix = unique_prefix()
    settings = _soak_settings(tmp_path, store=redis_url, redis_prefix=prefix)
    # The store is given, so runs go through this process' lanes rather than the shared Redis
    # queue: the batch is about what stays in the store, and this keeps it inside CI time.
    gw = Gateway(settings, clock=clock, store=open_store(settings))
    await gw.start()
    try:
        seen = await _soak(gw, clock)
    finally:
        await gw.stop()
        await _drop_prefix(prefix)
    (base_rows, base_bytes), (peak_rows, peak_bytes), (end_rows, end_bytes) = (
        seen["base"],
        seen["peak"],
        seen["end"],
    )
    assert peak_rows["sessions"] == RUNS and peak_rows["messages"] == 2 * RUNS
    assert end_rows["sessions"] == end_rows["messages"] == end_rows["subagents"] == 0
    assert end_rows["runs"] == base_rows["runs"] == 0
    assert peak_bytes > 10 * max(base_bytes, 1)
    assert end_bytes <= base_bytes + 64 * 1024, seen
