"""The subagent registry in the long tail: bad rows, hung hooks, failing writes, long queues,
deleted sessions, the depth limit after a sweep, and the bounds of its own bookkeeping.

A real gateway over a real WebSocket on a real SQLite file, with a FakeClock. Faults are real:
undecodable rows and blocking triggers are written into the gateway's own database file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from clawgate.client import ClientError
from clawgate.state.clock import FakeClock
from clawgate.store.records import SessionMeta, SubagentRecord, TranscriptMessage
from clawgate.store.sqlite import SqliteStore
from clawgate.subagents.hooks import SubagentEnded
from conftest import GatewayFactory, settle
from helpers import provider_sleeping
from test_subagent_restore import write_straight_into_store
from test_subagents import (
    MANUAL_TICKS,
    assert_partial,
    blocked_writes,
    connect,
    history,
    hooked,
    reasons,
    spawn,
    stored,
    tick,
    wait_for,
)


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "clawgate.db"


def insert_raw_subagent_row(db: Path, run_id: str, *, live: int, expires_at: float | None) -> None:
    """A row that does not decode (a torn write, a record from an incompatible build)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.execute(
            "INSERT INTO subagents VALUES (?,?,?,?,?)",
            (run_id, "agent:main:main", live, expires_at, b"{not json"),
        )
        conn.commit()
    finally:
        conn.close()


def quarantined_ids(db: Path) -> list[str]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return [r[0] for r in conn.execute("SELECT run_id FROM subagents_quarantine ORDER BY id")]
    finally:
        conn.close()


@asynccontextmanager
async def failing_updates(db: Path, when: str) -> AsyncIterator[None]:
    """Subagent record updates matching `when` fail inside the real SQLite file until lifted."""
    conn = sqlite3.connect(db, timeout=10)
    conn.execute(
        f"CREATE TRIGGER test_fail_update BEFORE UPDATE ON subagents WHEN {when} "
        "BEGIN SELECT RAISE(ABORT, 'blocked by test'); END"
    )
    try:
        yield
    finally:
        conn.execute("DROP TRIGGER IF EXISTS test_fail_update")
        conn.close()


class HungHook:
    """An async ended hook that never returns unless released (a call to a dead peer, no timeout)."""

    def __init__(self) -> None:
        self.events: list[SubagentEnded] = []
        self.release = asyncio.Event()

    async def on_subagent_ended(self, event: SubagentEnded) -> None:
        self.events.append(event)
        await self.release.wait()


# -- one undecodable row ---------------------------------------------------------------------------------
async def test_an_undecodable_due_row_is_quarantined_and_the_rows_behind_it_are_swept(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    # Due before every real record, so it sorts first in the expiry index on every tick.
    insert_raw_subagent_row(db_path(tmp_path), "bad-row", live=0, expires_at=clock.time() - 1)
    async with connect(rg) as c:
        ids = [(await spawn(c, "agent:main:q", f"[[reply:{i}]]", mode="session"))["runId"] for i in range(3)]
        await settle(gw)
        await clock.advance_async(gw.settings.subagent_session_ttl_s + 1)
        removed = await tick(gw)
        assert gw.maintenance.errors == {}
        assert removed["subagent_archive"] == 3
        for run_id in ids:
            assert await stored(gw, run_id) is None
        assert await gw.store.count_subagents() == 0
        status = await c.status()
    # Moved aside (kept for inspection), counted, visible in status.
    assert quarantined_ids(db_path(tmp_path)) == ["bad-row"]
    assert status["subagents"]["quarantined"] == 1
    async with httpx.AsyncClient(base_url=rg.http_url) as http:
        metrics = (await http.get("/metrics")).text
    assert 'clawgate_subagent_incidents_total{kind="quarantined"} 1.0' in metrics
    assert (await tick(gw))["subagent_archive"] == 0
    assert gw.maintenance.errors == {}


async def test_an_undecodable_live_row_never_prevents_a_start(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(parents=True)
    now = clock.time()
    child = "agent:main:subagent:77777777-0000-0000-0000-000000000001"
    await write_straight_into_store(
        state,
        SubagentRecord(
            run_id="good-run",
            child_session_key=child,
            requester_session_key="agent:main:live",
            task="never ran",
            created_at=now,
        ),
    )
    insert_raw_subagent_row(db_path(tmp_path), "bad-live-row", live=1, expires_at=None)
    log = tmp_path / "ended.jsonl"
    rg = await start_gateway(ended_hook_log=str(log), **MANUAL_TICKS)
    gw = rg.gateway
    await settle(gw)
    # The good record behind it was restored and finished.
    assert_partial(await stored(gw, "good-run"), {"status": "ended", "ended_notified": True})
    assert quarantined_ids(db_path(tmp_path)) == ["bad-live-row"]
    async with connect(rg) as c:
        status = await c.status()
    assert status["subagents"]["quarantined"] == 1


async def test_records_that_keep_failing_do_not_block_the_records_behind_them(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """A full batch (1000) plus one of the oldest due records fail every time (their child session
    cannot be deleted); the 2 healthy records behind them are still swept, the failing ones kept."""
    state = tmp_path / "state"
    state.mkdir(parents=True)
    now = clock.time()
    batch = 1000

    def archived(run_id: str, expires_at: float) -> SubagentRecord:
        return SubagentRecord(
            run_id=run_id,
            child_session_key=f"agent:main:subagent:{run_id}",
            requester_session_key="agent:main:p",
            task="t",
            status="ended",
            outcome="ok",
            ended_at=expires_at - 3600,
            announced_at=expires_at - 3600,
            cleanup_completed_at=expires_at - 3600,
            ended_reason="completed",
            ended_notified=True,
            expires_at=expires_at,
        )

    poisoned = [archived(f"poison-{i:04d}", now - 100) for i in range(batch + 1)]
    healthy = [archived(f"healthy-{i}", now - 50) for i in range(2)]
    sessions = [
        SessionMeta(key=r.child_session_key, session_id=r.run_id, created_at=now, updated_at=now)
        for r in poisoned + healthy
    ]
    await write_straight_into_store(state, *poisoned, *healthy, *sessions)
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    async with blocked_writes(state, "sessions", "{row}.key LIKE 'agent:main:subagent:poison-%'"):
        for _ in range(3):
            await tick(gw)
        for h in healthy:
            assert await stored(gw, h.run_id) is None, "a healthy record behind failing ones was never swept"
        assert await gw.store.count_subagents() == batch + 1
        assert gw.maintenance.errors["subagent_archive"] == 3
    # Lifted: the postponed records are swept once their retry time has come.
    await clock.advance_async(3600)
    await tick(gw)
    assert await gw.store.count_subagents() == 0


# -- a hook that never returns ------------------------------------------------------------------------------
async def test_a_hook_that_never_returns_is_abandoned_at_its_timeout(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(ended_hook_timeout_s=5, **MANUAL_TICKS)
    gw = rg.gateway
    hung = HungHook()
    gw.subagents.hooks.append(hung)
    after = hooked(gw)  # a hook after the hung one still gets the event
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:hung", "[[reply:x]]", mode="session")
        await wait_for(lambda: len(hung.events) == 1, "the hung hook to be called")
        assert len(gw.subagents.pipelines) == 1
        await clock.advance_async(5)
        await settle(gw, timeout=5)
        assert len(gw.subagents.pipelines) == 0 and not gw.subagents.tasks
        status = await c.status()
    assert status["subagents"]["hookTimeouts"] == 1
    assert reasons(after) == {res["runId"]: ["completed"]}
    assert_partial(await stored(gw, res["runId"]), {"ended_reason": "completed", "ended_notified": True})
    await clock.advance_async(gw.settings.subagent_session_ttl_s)
    assert (await tick(gw))["subagent_archive"] == 1
    assert len(hung.events) == 1  # abandoned, never re-delivered


async def test_a_hung_hook_never_holds_the_maintenance_tick(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """The in-memory backstop fires while the pipeline waits on a hung hook: the tick completes,
    every later sweep still runs, and the hook is not called a second time."""
    rg = await start_gateway(
        abort_ttl_min_s=10,
        abort_ttl_max_s=100,
        announce_hard_expiry_s=10,
        subagent_session_ttl_s=30,
        ended_hook_timeout_s=10**6,  # the timeout is not what saves the tick here
        **MANUAL_TICKS,
    )
    gw = rg.gateway
    hung = HungHook()
    gw.subagents.hooks.append(hung)
    later_sweeps: list[int] = []
    gw.registry.add_sweep("zz_after_subagents", lambda: later_sweeps.append(1) or 0)
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:hung-tick", "[[reply:x]]", mode="session")
        await wait_for(lambda: len(hung.events) == 1, "the hung hook to be called")
    await gw.store.flush()
    await clock.advance_async(200)  # past the subagent_runs backstop and the record's expiry
    for n in range(1, 4):
        await asyncio.wait_for(gw.maintenance.run_once(), 5)
        assert later_sweeps == [1] * n
    assert len(hung.events) == 1
    assert await stored(gw, res["runId"]) is not None  # its pipeline still owns it
    hung.release.set()
    await settle(gw)
    await tick(gw)
    assert await stored(gw, res["runId"]) is None
    assert [e.reason for e in hung.events] == ["completed"]


# -- one transient store error ----------------------------------------------------------------------------------
async def test_a_failed_write_during_cleanup_is_retried(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        # Cleanup's write (the first with an expiry) fails, as if the disk was full for a moment.
        async with failing_updates(db_path(tmp_path), "NEW.expires_at IS NOT NULL"):
            res = await spawn(c, "agent:main:blip", "[[reply:x]]", mode="session")
            await wait_for(lambda: gw.subagents.step_retries >= 1, "the cleanup write to fail")
        await clock.advance_async(1)  # the first retry delay
        await settle(gw, timeout=5)
    rec = await stored(gw, res["runId"])
    assert_partial(rec, {"ended_reason": "completed", "ended_notified": True})
    assert rec is not None and rec["expires_at"] is not None
    assert reasons(hook) == {res["runId"]: ["completed"]}
    await clock.advance_async(gw.settings.subagent_session_ttl_s + 1)
    assert (await tick(gw))["subagent_archive"] == 1


async def test_a_pipeline_that_keeps_failing_is_finished_by_the_sweep(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    rg = await start_gateway(subagent_retry_window_s=20, **MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        async with failing_updates(db_path(tmp_path), "NEW.expires_at IS NOT NULL"):
            res = await spawn(c, "agent:main:down", "[[reply:x]]", mode="session")
            await wait_for(lambda: gw.subagents.step_retries >= 1, "the cleanup write to fail")
            for _ in range(10):  # 1 + 2 + 4 + 8 + 8 s: past the retry window
                await clock.advance_async(8)
            await settle(gw, timeout=5)
            status = await c.status()
            assert status["subagents"]["stranded"] == 1
            assert status["subagents"]["pipelineFailures"] == 1
            assert hook.events == []
        # The store is back: the next tick writes the record and finishes it.
        await tick(gw)
        await settle(gw, timeout=5)
        await tick(gw)
        status = await c.status()
    assert status["subagents"]["stranded"] == 0
    assert reasons(hook) == {res["runId"]: ["swept"]}
    assert await stored(gw, res["runId"]) is None


# -- the backstop counts from the start -------------------------------------------------------------------------
async def test_a_child_that_waited_long_in_the_queue_keeps_its_record(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """Backstop (abort_ttl_max_s + announce_hard_expiry_s) = 210 s. The second child waits 150 s
    for the only subagent slot, then runs 150 s: 300 s after its spawn, 150 s after its start."""
    rg = await start_gateway(
        subagent_concurrency=1,
        abort_ttl_min_s=10,
        abort_ttl_max_s=200,
        announce_hard_expiry_s=10,
        **MANUAL_TICKS,
    )
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        first = await spawn(c, "agent:main:queue", "[[delay:150]][[reply:a]]", runTimeoutSeconds=1000)
        second = await spawn(c, "agent:main:queue", "[[delay:150]][[reply:b]]", runTimeoutSeconds=1000)
        # Each child's delay starts behind its run's history read: the clock moves on only once
        # the sleep has started (an advance before it would be lost on it and push its end out).
        await provider_sleeping(clock, 150, what="the first child's delay")
        for t in range(0, 330, 10):
            await clock.advance_async(10)
            await asyncio.sleep(0.01)
            if t + 10 == 150:  # the first child ends: the second takes the slot and sleeps 150 s
                await provider_sleeping(clock, 150, what="the second child's delay")
            if t % 50 == 0:
                await tick(gw)
        await settle(gw)
        announced = [m["runId"] for m in await history(c, "agent:main:queue") if m["role"] == "system"]
    for res in (first, second):
        assert_partial(
            await stored(gw, res["runId"]), {"status": "ended", "outcome": "ok", "ended_notified": True}
        )
    assert reasons(hook) == {first["runId"]: ["completed"], second["runId"]: ["completed"]}
    assert sorted(announced) == sorted([first["runId"], second["runId"]])


# -- a deleted session stays deleted -------------------------------------------------------------------------
async def test_an_announce_between_retries_does_not_recreate_a_deleted_requester(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    requester = "agent:main:gone"
    async with connect(rg) as c:
        async with blocked_writes(tmp_path / "state", "messages", "{row}.role = 'system'"):
            res = await spawn(c, requester, "[[reply:late news]]")
            await wait_for(lambda: gw.subagents.announce_failures >= 1, "the announce to fail once")
            await c.call("sessions.delete", {"key": requester})
        await clock.advance_async(2)  # the announce's retry time
        await settle(gw)
        assert await history(c, requester) == []
        listed = (await c.call("sessions.list", {}))["sessions"]
    assert await gw.store.get_session(requester) is None
    assert requester not in [s["key"] for s in listed]
    assert reasons(hook) == {res["runId"]: ["released"]}


async def test_a_child_deleted_by_cleanup_is_not_recreated_by_its_own_childs_announce(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(max_spawn_depth=2, **MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        child = await spawn(
            c,
            "agent:main:grand",
            '[[tool:sessions_spawn {"task":"[[delay:5]][[reply:grandchild done]]"}]]',
            cleanup="delete",
        )
        await wait_for(lambda: len(hook.events) == 1, "the child's cleanup")
        assert await gw.store.get_session(child["childSessionKey"]) is None
        # The grandchild's delay starts behind its run's history read, which the child's cleanup
        # does not wait for: advance once it sleeps.
        await provider_sleeping(clock, 5, what="the grandchild's delay")
        await clock.advance_async(5)  # the grandchild ends and announces into the deleted child session
        await settle(gw)
        assert await history(c, child["childSessionKey"]) == []
    assert await gw.store.get_session(child["childSessionKey"]) is None
    assert sorted(Counter(e.reason for e in hook.events).items()) == [("completed", 1), ("deleted", 1)]


async def test_append_to_existing_never_creates_a_session(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:
        msg = TranscriptMessage(session_key="agent:main:none", role="system", content="x", ts=clock.time())
        assert await store.append_to_existing(msg) is False
        assert await store.get_session("agent:main:none") is None
        assert await store.history("agent:main:none", 10) == []
    finally:
        await store.close()


# -- the depth limit after the record's sweep -------------------------------------------------------------------------
async def test_the_depth_limit_holds_after_the_childs_record_is_swept(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(max_spawn_depth=2, **MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        first = await spawn(c, "agent:main:deep", "[[reply:1]]", mode="session")
        second = await spawn(c, first["childSessionKey"], "[[reply:2]]", mode="session")
        await settle(gw)
        await clock.advance_async(gw.settings.subagent_session_ttl_s + 1)
        assert (await tick(gw))["subagent_archive"] == 2
        assert await stored(gw, second["runId"]) is None
        with pytest.raises(ClientError) as refused:
            await c.spawn(second["childSessionKey"], "[[reply:3]]")
        assert refused.value.code == "FORBIDDEN"
        assert refused.value.details == {"depth": 3, "maxSpawnDepth": 2}
        # One level up is still allowed.
        await spawn(c, first["childSessionKey"], "[[reply:2b]]")
        await settle(gw)


# -- bounds of the registry's own bookkeeping -------------------------------------------------------------------------
async def test_concurrent_spawns_cannot_both_pass_the_children_limit(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(max_children_per_agent=2, **MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        results = await asyncio.gather(
            *(c.spawn("agent:main:race", "[[stall]]") for _ in range(6)), return_exceptions=True
        )
        accepted = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, ClientError)]
        assert len(accepted) == 2, results
        assert {r.code for r in refused} == {"FORBIDDEN"}
        assert gw.subagents.active_children("agent:main:race") == 2  # type: ignore[arg-type]
        for r in accepted:
            await c.call("agent.abort", {"runId": r["runId"]})
        await settle(gw)


async def test_concurrent_spawns_cannot_both_pass_admission(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """max_tracked_runs=3: six spawns at once (idempotency keys make each await the store before
    it is tracked) must not all be admitted."""
    rg = await start_gateway(max_tracked_runs=3, **MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as first, connect(rg) as second, connect(rg) as third:
        clients = [first, second, third]
        results = await asyncio.gather(
            *(
                clients[i % 3].spawn(f"agent:main:adm-{i}", "[[stall]]", idempotencyKey=f"adm-{i}")
                for i in range(6)
            ),
            return_exceptions=True,
        )
        accepted = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, ClientError)]
        assert len(accepted) <= 3, results
        assert refused and {r.code for r in refused} == {"UNAVAILABLE"}
        assert len(gw.runs.active) <= 3
        for r in accepted:
            await first.call("agent.abort", {"runId": r["runId"]})
        await settle(gw)


async def test_pipelines_over_the_task_bound_wait_instead_of_being_dropped(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(ended_hook_timeout_s=10**6, **MANUAL_TICKS)
    gw = rg.gateway
    gw.subagents.max_tasks = 2  # the bound (max_tracked_runs), shrunk so it is reached
    hung = HungHook()
    gw.subagents.hooks.append(hung)
    hook = hooked(gw)
    async with connect(rg) as c:
        ids = [(await spawn(c, "agent:main:bound", f"[[reply:{i}]]"))["runId"] for i in range(5)]
        await wait_for(lambda: len(hung.events) == 2, "two pipelines holding both task slots")
        # The other three children end on their own time (store round trips): wait for their
        # pipelines to be deferred, then check none of them got a task past the bound.
        await wait_for(lambda: len(gw.subagents.deferred) >= 3, "three pipelines deferred")
        await asyncio.sleep(0.05)  # a pipeline started past the bound would show up here
        assert len(gw.subagents.tasks) == 2
        assert len(gw.subagents.deferred) == 3
        status = await c.status()
        assert status["state"]["subagent_tasks"] <= 2
        hung.release.set()
        await settle(gw)
    assert reasons(hook) == {run_id: ["completed"] for run_id in ids}
    assert gw.subagents.pipelines_deferred == 3


async def test_a_state_file_without_the_session_depth_column_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE sessions (key TEXT PRIMARY KEY, session_id TEXT NOT NULL, created_at REAL NOT NULL, "
        "updated_at REAL NOT NULL, kind TEXT NOT NULL, agent_id TEXT NOT NULL, label TEXT, model TEXT)"
    )
    conn.execute("INSERT INTO sessions VALUES ('agent:main:old', 's', 1, 1, 'main', 'main', NULL, NULL)")
    conn.commit()
    conn.close()
    store = SqliteStore(db)
    await store.open()
    try:
        old = await store.get_session("agent:main:old")
        assert old is not None and old.depth == 0
        await store.put_session(
            SessionMeta(key="agent:main:subagent:d", session_id="d", created_at=1, updated_at=1, depth=2)
        )
        new = await store.get_session("agent:main:subagent:d")
        assert new is not None and new.depth == 2
    finally:
        await store.close()
