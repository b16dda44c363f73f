"""The subagent registry end to end: a real gateway over WebSocket, real SQLite, a FakeClock.

Each test names the docs/design.md rule it guards. The helpers here
(`assert_partial`, `wait_for`, ...) are shared with the other subagent test files.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from clawgate.client import Client, ClientError
from clawgate.ids import RunId, SessionKey
from clawgate.server.gateway import Gateway
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from clawgate.subagents.hooks import RecordingHook, SubagentEnded
from conftest import GatewayFactory, settle
from helpers import provider_sleeping

# Every in-memory structure of the subagent registry (docs/design.md, bounded by construction).
SUBAGENT_STRUCTURES = (
    "subagent_runs",
    "subagent_children",
    "subagent_requesters",
    "subagent_pending_errors",
    "subagent_announces",
    "subagent_pipelines",
    "subagent_tasks",
)

# Maintenance ticks only when a test says `run_once`, so a test controls exactly when sweeps run.
MANUAL_TICKS: dict[str, Any] = {
    "maintenance_interval_s": 10**7,
    "tick_interval_s": 10**7,
    "shutdown_grace_s": 0,  # teardown does not wait (in real time) for stalled runs
}


# -- shared helpers ---------------------------------------------------------------------------------
_MISSING = object()


def assert_partial(record: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    """Rule 10: compare a record by the fields the test cares about, not by exact equality."""
    assert record is not None, f"expected a record matching {expected}, got None"
    diff = {
        key: (record.get(key, _MISSING), want)
        for key, want in expected.items()
        if record.get(key, _MISSING) != want
    }
    assert not diff, f"record differs (field: (actual, expected)): {diff}"


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Bounded wait for something that happens on another task or the store thread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def stored(gw: Gateway, run_id: str) -> dict[str, Any] | None:
    rec = await gw.store.get_subagent(run_id)
    return None if rec is None else msgspec.to_builtins(rec)


def memory(gw: Gateway) -> dict[str, int]:
    sizes = gw.registry.sizes()
    return {name: sizes[name] for name in SUBAGENT_STRUCTURES}


def assert_registry_empty(gw: Gateway) -> None:
    assert memory(gw) == dict.fromkeys(SUBAGENT_STRUCTURES, 0)


async def tick(gw: Gateway) -> dict[str, int]:
    removed = await gw.maintenance.run_once()
    await gw.store.flush()
    return removed


async def advance(clock: FakeClock, gw: Gateway, seconds: float) -> None:
    await clock.advance_async(seconds)
    await settle(gw)


@asynccontextmanager
async def connect(rg: RunningGateway) -> AsyncIterator[Client]:
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        yield c


async def spawn(c: Client, requester: str, task: str, **kw: Any) -> dict[str, Any]:
    res = await c.spawn(requester, task, **kw)
    assert res["status"] == "accepted"
    return res


async def history(c: Client, key: str) -> list[dict[str, Any]]:
    return list((await c.call("chat.history", {"sessionKey": key}))["messages"])


def hooked(gw: Gateway) -> RecordingHook:
    hook = RecordingHook()
    gw.subagents.hooks.append(hook)
    return hook


def reasons(hook: RecordingHook) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ev in hook.events:
        out.setdefault(ev.run_id, []).append(ev.reason)
    return out


@asynccontextmanager
async def blocked_writes(state_dir: Path, table: str, when: str) -> AsyncIterator[None]:
    """Make matching writes fail inside the real SQLite file (a trigger), then lift the block.

    Real fault injection: the gateway's own store sees a real `sqlite3` error.
    """
    db = sqlite3.connect(state_dir / "clawgate.db", timeout=10)
    op = "INSERT" if table == "messages" else "DELETE"
    row = "NEW" if op == "INSERT" else "OLD"
    db.execute(
        f"CREATE TRIGGER test_block BEFORE {op} ON {table} WHEN {when.format(row=row)} "
        "BEGIN SELECT RAISE(ABORT, 'blocked by test'); END"
    )
    try:
        yield
    finally:
        db.execute("DROP TRIGGER IF EXISTS test_block")
        db.close()


# -- the agent tool: spawn, announce, events ----------------------------------------------------------
async def test_tool_spawn_announces_result_into_requester_and_emits_events(
    start_gateway: GatewayFactory,
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        await c.subscribe(["agent:main:main"])
        final = await c.run_agent(
            '[[tool:sessions_spawn {"task":"child work [[reply:child says hi]]","label":"helper"}]]',
            idempotency_key="parent-1",
        )
        assert final["status"] == "ok"
        assert '"status": "accepted"' in final["result"]["payloads"][0]["text"]
        await settle(gw)

        runs = (await c.call("subagents.list", {"sessionKey": "agent:main:main"}))["runs"]
        assert len(runs) == 1
        run = runs[0]
        assert_partial(
            run,
            {
                "requesterSessionKey": "agent:main:main",
                "label": "helper",
                "mode": "run",
                "cleanup": "keep",
                "status": "ok",
                "cleanupCompletedAt": int(clock_ms(gw)),
            },
        )
        assert run["childSessionKey"].startswith("agent:main:subagent:")

        # The announce is a message of the requester's session: its next turn sees it.
        main = await history(c, "agent:main:main")
        announces = [m for m in main if m.get("runId") == run["runId"]]
        assert len(announces) == 1
        assert announces[0]["role"] == "system"
        assert "child says hi" in announces[0]["content"]
        child = await history(c, run["childSessionKey"])
        assert [(m["role"], m["content"]) for m in child][-1] == ("assistant", "child says hi")

        # `subagent` events reach the requester's subscriber, in pipeline order.
        phases = []
        while not c.events.empty():
            frame = c.events.get_nowait()
            if frame.get("event") == "subagent":
                payload = frame["payload"]
                assert_partial(payload, {"runId": run["runId"], "requesterSessionKey": "agent:main:main"})
                phases.append((payload["phase"], payload.get("outcome")))
        assert phases == [("spawned", None), ("ended", "ok"), ("announced", "ok"), ("cleaned", "ok")]

    assert reasons(hook) == {run["runId"]: ["completed"]}
    assert_registry_empty(gw)


def clock_ms(gw: Gateway) -> float:
    return gw.clock.time() * 1000


async def test_spawn_idempotency_key_returns_the_same_run(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        first = await spawn(c, "agent:main:idem", "[[reply:once]]", idempotencyKey="spawn-key-1")
        again = await spawn(c, "agent:main:idem", "[[reply:once]]", idempotencyKey="spawn-key-1")
        assert again == first
        # Concurrent retries of one key also join one spawn.
        racing = await asyncio.gather(
            *(spawn(c, "agent:main:idem", "[[reply:twice]]", idempotencyKey="spawn-key-2") for _ in range(6))
        )
        assert len({r["runId"] for r in racing}) == 1
        assert racing[0]["runId"] != first["runId"]
        await settle(gw)
        runs = (await c.call("subagents.list", {"sessionKey": "agent:main:idem"}))["runs"]
        assert sorted(r["runId"] for r in runs) == sorted([first["runId"], racing[0]["runId"]])
        # A retry after the child finished still answers with the same run, spawns nothing.
        late = await spawn(c, "agent:main:idem", "[[reply:once]]", idempotencyKey="spawn-key-1")
        assert late == first
        await settle(gw)
        assert await gw.store.count_subagents() == 2


async def test_subagents_list_by_requester(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        a1 = await spawn(c, "agent:main:req-a", "[[reply:a1]]", label="a1")
        a2 = await spawn(c, "agent:main:req-a", "[[reply:a2]]", label="a2", mode="session")
        b1 = await spawn(c, "agent:main:req-b", "[[reply:b1]]", label="b1", cleanup="delete")
        await settle(gw)
        runs_a = (await c.call("subagents.list", {"sessionKey": "agent:main:req-a"}))["runs"]
        runs_b = (await c.call("subagents.list", {"sessionKey": "agent:main:req-b"}))["runs"]
        everything = (await c.call("subagents.list", {}))["runs"]
    by_id = {r["runId"]: r for r in runs_a}
    assert set(by_id) == {a1["runId"], a2["runId"]}
    assert_partial(by_id[a1["runId"]], {"label": "a1", "mode": "run", "status": "ok"})
    assert_partial(by_id[a2["runId"]], {"label": "a2", "mode": "session", "status": "ok"})
    assert [r["runId"] for r in runs_b] == [b1["runId"]]
    assert_partial(runs_b[0], {"cleanup": "delete", "requesterSessionKey": "agent:main:req-b"})
    assert {r["runId"] for r in everything} == {a1["runId"], a2["runId"], b1["runId"]}


# -- limits ----------------------------------------------------------------------------------------------
async def test_spawn_depth_limit(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    async with connect(rg) as c:
        child = await spawn(c, "agent:main:main", "[[stall]]", runTimeoutSeconds=3600)
        with pytest.raises(ClientError) as err:
            await c.spawn(child["childSessionKey"], "grandchild")
        assert err.value.code == "FORBIDDEN"
        assert err.value.details == {"depth": 2, "maxSpawnDepth": 1}


async def test_spawn_depth_two_allows_grandchildren_only(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_spawn_depth=2, **MANUAL_TICKS)
    async with connect(rg) as c:
        child = await spawn(c, "agent:main:main", "[[stall]]", runTimeoutSeconds=3600)
        grandchild = await spawn(c, child["childSessionKey"], "[[stall]]", runTimeoutSeconds=3600)
        rec = await stored(rg.gateway, grandchild["runId"])
        assert_partial(rec, {"depth": 2, "requester_session_key": child["childSessionKey"]})
        with pytest.raises(ClientError) as err:
            await c.spawn(grandchild["childSessionKey"], "too deep")
        assert err.value.code == "FORBIDDEN"
        assert err.value.details == {"depth": 3, "maxSpawnDepth": 2}


async def test_max_children_per_requester(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        kids = [
            await spawn(c, "agent:main:busy", f"[[stall]] kid {i}", runTimeoutSeconds=3600) for i in range(5)
        ]
        with pytest.raises(ClientError) as err:
            await c.spawn("agent:main:busy", "the sixth")
        assert err.value.code == "FORBIDDEN"
        assert err.value.details == {"activeChildren": 5, "maxChildrenPerAgent": 5}
        # The limit is per requester.
        await spawn(c, "agent:main:other", "[[reply:fine]]")
        # An ended child no longer counts.
        await c.abort(kids[0]["runId"])
        await wait_for(
            lambda: gw.subagents.active_children(SessionKey("agent:main:busy")) == 4, "one child ended"
        )
        await spawn(c, "agent:main:busy", "[[stall]] replacement", runTimeoutSeconds=3600)
        with pytest.raises(ClientError):
            await c.spawn("agent:main:busy", "the sixth again")


# -- the batch: everything returns to baseline -------------------------------------------------------------
BATCH = 5000
REQUESTERS = 1000  # max_children_per_agent stays at its default of 5


async def test_batch_of_5000_session_spawns_leaves_nothing_behind(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """Rules 1, 3, 5 at scale: the reference gateway kept every finished session-mode run forever."""
    rg = await start_gateway(
        subagent_concurrency=256,
        rate_limit_burst=100_000,
        sqlite_batch_max=4096,
        **MANUAL_TICKS,
    )
    gw = rg.gateway
    hook = hooked(gw)
    sem = asyncio.Semaphore(250)
    run_ids: list[str] = []

    async def one(c: Client, i: int) -> None:
        async with sem:
            res = await c.spawn(f"agent:main:batch-{i % REQUESTERS}", f"[[reply:r{i}]]", mode="session")
            run_ids.append(res["runId"])

    clients = [Client(rg.url, max_reconnect_attempts=0) for _ in range(4)]
    for cl in clients:
        await cl.connect()
    try:
        await asyncio.gather(*(one(clients[i % 4], i) for i in range(BATCH)))
        await settle(gw, timeout=60)
        assert len(set(run_ids)) == BATCH
        assert await gw.store.count_subagents() == BATCH
        assert len(hook.events) == BATCH
        assert {e.reason for e in hook.events} == {"completed"}
        # In memory, nothing is held once pipelines are done (records live in the store).
        assert_registry_empty(gw)
        assert gw.registry.sizes()["run_contexts"] == 0  # rule 3

        # Rule 1: one second before the TTL after cleanup, every record is still there.
        await advance(clock, gw, gw.settings.subagent_session_ttl_s - 1)
        await tick(gw)
        assert await gw.store.count_subagents() == BATCH

        await advance(clock, gw, 2)
        removed = await tick(gw)
        assert removed["subagent_archive"] == BATCH
        status = await clients[0].status()
        assert status["stored"]["subagent_records"] == 0
        for name in (*SUBAGENT_STRUCTURES, "run_contexts", "runs_active", "session_lanes", "run_watchers"):
            assert status["state"][name] == 0, name
        # Rule 7: the sweep of records already reported `completed` is silent.
        assert len(hook.events) == BATCH
        assert gw.subagents.ended_reports == BATCH
    finally:
        for cl in clients:
            await cl.close()


# -- rule 1: expiry counts from cleanup completed ----------------------------------------------------------
async def test_rule1_record_is_not_swept_while_its_cleanup_is_held(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """Rule 1: the announce fails and retries (1, 2, 4, 8, 8 ... s); the record outlives any TTL
    counted from its end, and dies exactly `subagent_session_ttl_s` after cleanup completed."""
    rg = await start_gateway(announce_expiry_s=3600, **MANUAL_TICKS)
    gw = rg.gateway
    svc = gw.subagents
    hook = hooked(gw)
    ttl = gw.settings.subagent_session_ttl_s
    async with connect(rg) as c:
        async with blocked_writes(tmp_path / "state", "messages", "{row}.role = 'system'"):
            res = await spawn(c, "agent:main:held", "[[reply:held result]]", mode="session")
            run_id = res["runId"]
            await wait_for(lambda: svc.announce_failures == 1, "the first announce attempt to fail")
            ended_at = clock.time()
            assert_partial(
                await stored(gw, run_id),
                {"status": "ended", "outcome": "ok", "ended_at": ended_at, "cleanup_completed_at": None},
            )
            # Retry delays: 1, 2, 4, 8, then 8 again; each advance wakes exactly one retry.
            failures = 1
            for delay in (1, 2, 4, 8, 8, 8):
                await clock.advance_async(delay - 0.5)
                await asyncio.sleep(0.01)
                assert svc.announce_failures == failures, f"retried before its {delay} s delay"
                await clock.advance_async(0.5)
                failures += 1
                await wait_for(lambda n=failures: svc.announce_failures == n, f"retry {failures}")
            while clock.time() - ended_at < ttl + 60:
                await clock.advance_async(8)
                failures += 1
                await wait_for(lambda n=failures: svc.announce_failures == n, f"retry {failures}")
            removed = await tick(gw)
            assert removed["subagent_archive"] == 0
            assert_partial(
                await stored(gw, run_id),
                {"cleanup_completed_at": None, "expires_at": None, "status": "ended"},
            )
            assert hook.events == []
        # The block is lifted: the next retry delivers, cleanup completes.
        await clock.advance_async(8)
        await settle(gw)
        cleaned_at = clock.time()
        rec = await stored(gw, run_id)
        assert_partial(
            rec,
            {"cleanup_completed_at": cleaned_at, "expires_at": cleaned_at + ttl, "ended_reason": "completed"},
        )
        assert rec is not None and rec["announced_at"] == cleaned_at
        main = await history(c, "agent:main:held")
        assert [m["content"] for m in main if m["role"] == "system"] == [
            f"[subagent {run_id} finished: ok]\nheld result"
        ]
    await clock.advance_async(ttl - 0.5)
    await tick(gw)
    assert await stored(gw, run_id) is not None
    await clock.advance_async(1)
    assert (await tick(gw))["subagent_archive"] == 1
    assert await stored(gw, run_id) is None
    assert reasons(hook) == {run_id: ["completed"]}
    assert_registry_empty(gw)


async def test_rule1_session_record_lives_exactly_its_ttl_after_cleanup(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """Rule 1: a session-mode record is removed `subagent_session_ttl_s` after cleanup completed,
    not before, and the child session stays for follow-ups."""
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    ttl = gw.settings.subagent_session_ttl_s
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:ttl", "[[reply:sess]]", mode="session")
        await settle(gw)
        cleaned_at = clock.time()
        assert_partial(
            await stored(gw, res["runId"]),
            {"mode": "session", "cleanup_completed_at": cleaned_at, "expires_at": cleaned_at + ttl},
        )
        await clock.advance_async(ttl - 0.001)
        await tick(gw)
        assert await stored(gw, res["runId"]) is not None
        await clock.advance_async(0.002)
        await tick(gw)
        assert await stored(gw, res["runId"]) is None
        # Session mode: the sweep keeps the child session.
        assert [m["content"] for m in await history(c, res["childSessionKey"])][-1] == "sess"


async def test_announce_gives_up_after_its_expiry_and_cleanup_goes_on(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """A requester that cannot be written to for 5 minutes: the announce expires, cleanup completes
    (from then on the record's TTL counts, rule 1), no `announced` event is claimed."""
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    svc = gw.subagents
    hook = hooked(gw)
    async with connect(rg) as c:
        await c.subscribe(["agent:main:unreachable"])
        async with blocked_writes(tmp_path / "state", "messages", "{row}.role = 'system'"):
            res = await spawn(c, "agent:main:unreachable", "[[reply:lost]]", mode="session")
            await wait_for(lambda: svc.announce_failures == 1, "the first failure")
            ended_at = clock.time()
            while svc.announces_expired == 0:
                assert clock.time() - ended_at <= gw.settings.announce_expiry_s + 8
                failures = svc.announce_failures
                await clock.advance_async(8)
                await wait_for(lambda n=failures: svc.announce_failures > n, "a retry")
            await settle(gw)
        assert svc.announces_expired == 1
        cleaned_at = clock.time()
        assert cleaned_at - ended_at >= gw.settings.announce_expiry_s
        assert_partial(
            await stored(gw, res["runId"]),
            {"cleanup_completed_at": cleaned_at, "expires_at": cleaned_at + 300, "ended_reason": "completed"},
        )
        assert await history(c, "agent:main:unreachable") == []
        await c.status()  # a round trip: every event emitted before it has arrived
        phases = [f["payload"]["phase"] for f in drain_events(c) if f.get("event") == "subagent"]
        assert phases == ["spawned", "ended", "cleaned"]
    assert reasons(hook) == {res["runId"]: ["completed"]}
    assert_registry_empty(gw)


def drain_events(c: Client) -> list[dict[str, Any]]:
    out = []
    while not c.events.empty():
        out.append(c.events.get_nowait())
    return out


async def test_timeout_and_abort_are_final_at_once_with_their_outcome(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """Only lifecycle errors are held for the grace; a timeout or an abort is final at its end."""
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        slow = await spawn(c, "agent:main:ends", "[[stall]]", runTimeoutSeconds=5)
        stopped = await spawn(c, "agent:main:ends", "[[stall]]", runTimeoutSeconds=3600)
        await wait_for(lambda: gw.runs.running == 2, "both children to run")
        await c.abort(stopped["runId"])
        await advance(clock, gw, 5)
        assert_partial(await stored(gw, slow["runId"]), {"outcome": "timeout", "error": "run timed out"})
        assert_partial(await stored(gw, stopped["runId"]), {"outcome": "aborted", "error": "aborted"})
        contents = sorted(m["content"] for m in await history(c, "agent:main:ends"))
    assert contents == sorted(
        [
            f"[subagent {slow['runId']} finished: timeout] run timed out",
            f"[subagent {stopped['runId']} finished: aborted] aborted",
        ]
    )
    assert sorted((e.outcome, e.reason) for e in hook.events) == [
        ("aborted", "completed"),
        ("timeout", "completed"),
    ]
    assert_registry_empty(gw)


async def test_frozen_result_is_capped(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(frozen_result_max_bytes=1000, **MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:big", "[[size:5000]]")
        await settle(gw)
        rec = await stored(gw, res["runId"])
        assert rec is not None
        assert rec["frozen_result"] == ("abcdefghijklmnopqrstuvwxyz0123456789 " * 30)[:1000]
        # The child's own transcript keeps the whole reply.
        assert len((await history(c, res["childSessionKey"]))[-1]["content"]) == 5000


async def test_deleting_the_requester_releases_its_children(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """Rule 7, reason `released`: reported once, nothing is announced into the deleted session."""
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:gone", "[[stall]]", runTimeoutSeconds=3600)
        await wait_for(lambda: gw.runs.running == 1, "the child to run")
        await c.call("sessions.delete", {"key": "agent:main:gone"})
        await settle(gw)
        assert_partial(
            await stored(gw, res["runId"]),
            {"outcome": "aborted", "ended_reason": "released", "announced_at": None, "ended_notified": True},
        )
        assert await history(c, "agent:main:gone") == []
        listed = (await c.call("sessions.list", {"limit": 1000}))["sessions"]
        assert "agent:main:gone" not in {s["key"] for s in listed}
    await clock.advance_async(gw.settings.subagent_archive_after_s + 1)
    assert (await tick(gw))["subagent_archive"] == 1
    assert reasons(hook) == {res["runId"]: ["released"]}
    assert_registry_empty(gw)


# -- run mode: archive -------------------------------------------------------------------------------------
async def test_run_mode_is_archived_after_archive_time_and_deletes_the_child(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    archive = gw.settings.subagent_archive_after_s
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:arch", "[[reply:archived later]]")
        child = res["childSessionKey"]
        await settle(gw)
        ended_at = clock.time()
        assert_partial(await stored(gw, res["runId"]), {"mode": "run", "expires_at": ended_at + archive})
        assert len(await history(c, child)) == 2

        await clock.advance_async(archive - 1)
        await tick(gw)
        assert await stored(gw, res["runId"]) is not None
        assert len(await history(c, child)) == 2

        await clock.advance_async(2)
        assert (await tick(gw))["subagent_archive"] == 1
        assert await stored(gw, res["runId"]) is None
        assert await history(c, child) == []
        listed = (await c.call("sessions.list", {"limit": 1000}))["sessions"]
        assert child not in {s["key"] for s in listed}
        assert "agent:main:arch" in {s["key"] for s in listed}
    # Already reported `completed`: archiving reports nothing more (rule 7).
    assert reasons(hook) == {res["runId"]: ["completed"]}


# -- rule 7: exactly once ------------------------------------------------------------------------------------
async def test_rule7_ended_hook_fires_once_for_keep_and_delete(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        keep = await spawn(c, "agent:main:once", "[[reply:kept]]")
        delete = await spawn(c, "agent:main:once", "[[reply:deleted]]", cleanup="delete")
        skeep = await spawn(c, "agent:main:once", "[[reply:s-kept]]", mode="session")
        sdel = await spawn(c, "agent:main:once", "[[reply:s-deleted]]", mode="session", cleanup="delete")
        await settle(gw)
        assert reasons(hook) == {
            keep["runId"]: ["completed"],
            delete["runId"]: ["deleted"],
            skeep["runId"]: ["completed"],
            sdel["runId"]: ["deleted"],
        }
        assert {e.run_id: e.outcome for e in hook.events} == dict.fromkeys(
            (keep["runId"], delete["runId"], skeep["runId"], sdel["runId"]), "ok"
        )
        assert not any(e.redelivery for e in hook.events)
        # `delete` removed the child session at cleanup; `keep` kept it.
        assert await history(c, delete["childSessionKey"]) == []
        assert await history(c, sdel["childSessionKey"]) == []
        assert len(await history(c, keep["childSessionKey"])) == 2
        assert len(await history(c, skeep["childSessionKey"])) == 2

        await clock.advance_async(gw.settings.subagent_archive_after_s + 1)
        assert (await tick(gw))["subagent_archive"] == 4
        assert await gw.store.count_subagents() == 0
        await tick(gw)
    # The sweep is silent for records already reported.
    assert len(hook.events) == 4
    assert gw.subagents.ended_reports == 4


class RaisingHook:
    def __init__(self) -> None:
        self.calls = 0

    def on_subagent_ended(self, event: SubagentEnded) -> None:
        self.calls += 1
        raise RuntimeError("hook blew up")


async def test_rule7_a_raising_hook_is_counted_and_the_registry_goes_on(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    bad = RaisingHook()
    gw.subagents.hooks.append(bad)  # type: ignore[arg-type]
    good = hooked(gw)
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:hooks", "[[reply:x]]", mode="session")
        await settle(gw)
    assert gw.subagents.hook_errors == 1
    assert bad.calls == 1
    assert reasons(good) == {res["runId"]: ["completed"]}  # later hooks still ran
    assert_partial(await stored(gw, res["runId"]), {"ended_reason": "completed", "ended_notified": True})
    assert_registry_empty(gw)
    await clock.advance_async(gw.settings.subagent_session_ttl_s + 1)
    assert (await tick(gw))["subagent_archive"] == 1
    assert await stored(gw, res["runId"]) is None
    assert (bad.calls, gw.subagents.hook_errors, len(good.events)) == (1, 1, 1)  # not re-delivered


class BlockingHook:
    """An async hook that holds the pipeline until the test releases it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.events: list[SubagentEnded] = []

    async def on_subagent_ended(self, event: SubagentEnded) -> None:
        self.events.append(event)
        self.entered.set()
        await self.release.wait()


async def test_rule1_a_record_whose_pipeline_is_in_flight_is_not_swept(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """Rule 1/7: an async hook still running past the TTL keeps the record; once it returns the
    record is swept silently, and the hook was called once."""
    # The hook's timeout is longer than the TTL here (a hook past its timeout is abandoned).
    rg = await start_gateway(ended_hook_timeout_s=3600, **MANUAL_TICKS)
    gw = rg.gateway
    hook = BlockingHook()
    gw.subagents.hooks.append(hook)
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:slow-hook", "[[reply:x]]", mode="session")
        await asyncio.wait_for(hook.entered.wait(), 10)
    await gw.store.flush()
    await clock.advance_async(gw.settings.subagent_session_ttl_s + 1)
    assert (await tick(gw))["subagent_archive"] == 0
    assert_partial(await stored(gw, res["runId"]), {"ended_reason": "completed", "ended_notified": False})
    hook.release.set()
    await settle(gw)
    assert_partial(await stored(gw, res["runId"]), {"ended_notified": True})
    assert (await tick(gw))["subagent_archive"] == 1
    assert await stored(gw, res["runId"]) is None
    assert [e.reason for e in hook.events] == ["completed"]
    assert_registry_empty(gw)


# -- rule 4: pending lifecycle errors ---------------------------------------------------------------------------
async def test_rule4_retry_start_clears_the_pending_error(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    seen: list[tuple[str, bool, int]] = []

    def observe(run_id: Any, key: Any, stream: str, data: dict[str, Any]) -> None:
        # Runs after the registry's own listener: sees the state the registry left.
        if stream == "lifecycle" and ":subagent:" in key:
            label = "retry-error" if data.get("willRetry") else str(data.get("phase"))
            seen.append((label, run_id in gw.subagents.pending_errors, len(gw.subagents.pending_errors)))

    gw.bus.listeners.append(observe)
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:flaky", "[[error-once:flaky upstream]] [[reply:recovered]]")
        await settle(gw)
    assert seen == [("start", False, 0), ("retry-error", True, 1), ("start", False, 0), ("end", False, 0)]
    assert [(e.run_id, e.reason, e.outcome) for e in hook.events] == [(res["runId"], "completed", "ok")]
    assert_registry_empty(gw)


async def test_rule4_error_is_final_only_after_the_grace(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    assert gw.settings.lifecycle_error_grace_s == 15
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:grace", "[[error:model exploded]]")
        run_id = res["runId"]
        await settle(gw)
        assert RunId(run_id) in gw.subagents.pending_errors
        await advance(clock, gw, 14)
        assert_partial(await stored(gw, run_id), {"status": "running", "outcome": None})
        assert hook.events == []
        await advance(clock, gw, 2)
        assert_partial(
            await stored(gw, run_id),
            {"status": "ended", "outcome": "error", "error": "model exploded", "ended_reason": "completed"},
        )
        runs = (await c.call("subagents.list", {"sessionKey": "agent:main:grace"}))["runs"]
        assert_partial(runs[0], {"runId": run_id, "status": "error"})
        main = await history(c, "agent:main:grace")
        assert [m["content"] for m in main] == [f"[subagent {run_id} finished: error] model exploded"]
    assert [(e.reason, e.outcome) for e in hook.events] == [("completed", "error")]
    assert_registry_empty(gw)


async def test_rule4_pending_error_is_swept_after_5_minutes_when_its_timer_is_lost(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)
    async with connect(rg) as c:
        res = await spawn(c, "agent:main:lost", "[[error:lost timer]]")
        await settle(gw)
    run_id = RunId(res["runId"])
    pending = gw.subagents.pending_errors.get(run_id)
    assert pending is not None and pending.timer is not None
    recorded_at = pending.recorded_at
    pending.timer.cancel()  # the grace timer is lost
    await advance(clock, gw, 60)
    assert run_id in gw.subagents.pending_errors
    await clock.advance_async(gw.settings.pending_error_ttl_s - 60 - 1)
    await tick(gw)
    await settle(gw)
    assert run_id in gw.subagents.pending_errors
    assert hook.events == []
    await clock.advance_async(1)
    assert clock.time() == recorded_at + gw.settings.pending_error_ttl_s
    await tick(gw)
    await settle(gw)
    assert_partial(await stored(gw, run_id), {"status": "ended", "outcome": "error", "error": "lost timer"})
    assert [(e.reason, e.outcome) for e in hook.events] == [("completed", "error")]
    assert_registry_empty(gw)


# -- rule 6: an isolated sweep ---------------------------------------------------------------------------------
async def test_rule6_a_raising_sweep_does_not_stop_the_tick(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(maintenance_interval_s=60)
    gw = rg.gateway

    def explode() -> int:
        raise RuntimeError("sweep blew up")

    gw.registry.add_sweep("test_exploding", explode)
    async with connect(rg) as c:
        ids = [
            (await spawn(c, "agent:main:six", f"[[reply:{i}]]", mode="session"))["runId"] for i in range(3)
        ]
        await settle(gw)
    await clock.advance_async(gw.settings.subagent_session_ttl_s + 1)  # the loop ticks on its own too
    await settle(gw)
    removed = await tick(gw)
    assert await gw.store.count_subagents() == 0
    assert gw.maintenance.errors["test_exploding"] >= 2
    assert "test_exploding" not in removed
    assert set(removed) >= {"subagent_archive", "run_contexts", "store_runs"}
    # The loop is still alive after ticks that raised.
    assert gw.maintenance.running
    ticks = gw.maintenance.ticks
    await clock.advance_async(60)
    await wait_for(lambda: gw.maintenance.ticks == ticks + 1, "the next tick")
    for run_id in ids:
        assert await stored(gw, run_id) is None


async def test_rule6_one_failing_record_does_not_block_the_archive_sweep(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """A record whose archive fails is kept for the next tick; the others are swept; the error is
    counted; the sweeps after it in the tick still run."""
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    async with connect(rg) as c:
        poisoned = await spawn(c, "agent:main:poison", "[[reply:p]]")
        healthy = [await spawn(c, "agent:main:poison", f"[[reply:h{i}]]") for i in range(3)]
        await settle(gw)
        await clock.advance_async(gw.settings.subagent_archive_after_s + 1)
        key = poisoned["childSessionKey"]
        async with blocked_writes(tmp_path / "state", "sessions", f"{{row}}.key = '{key}'"):
            removed = await tick(gw)
            assert "subagent_archive" not in removed
            assert gw.maintenance.errors == {"subagent_archive": 1}
            assert gw.subagents.sweep_errors == 1
            assert set(removed) >= {"run_contexts", "store_runs"}
            for h in healthy:
                assert await stored(gw, h["runId"]) is None
            assert await stored(gw, poisoned["runId"]) is not None
        assert (await tick(gw))["subagent_archive"] == 1
        assert await stored(gw, poisoned["runId"]) is None
        assert await history(c, key) == []


# -- rules 2 and 3: run contexts of subagent runs -----------------------------------------------------------------
async def test_rule2_emitting_and_silent_children_keep_their_contexts_while_they_run(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(**MANUAL_TICKS)
    gw = rg.gateway
    idle_ttl = gw.settings.run_context_idle_ttl_s
    async with connect(rg) as c:
        chatty = await spawn(
            c, "agent:main:ctx", "[[size:40]] [[chunks:40]] [[delay:60]]", runTimeoutSeconds=7200
        )
        idle = await spawn(c, "agent:main:ctx", "[[stall]]", runTimeoutSeconds=7200)
        await wait_for(
            lambda: RunId(chatty["runId"]) in gw.bus.contexts and RunId(idle["runId"]) in gw.bus.contexts,
            "both runs to start",
        )
        # The chatty run's first chunk delay starts behind its history read, after its context
        # exists: a first advance before it would be lost on it.
        await provider_sleeping(clock, 60, what="the chatty run's first chunk delay")
        minutes = 0
        while minutes * 60 < idle_ttl + 300:  # 35 minutes: past the idle TTL
            await clock.advance_async(60)
            minutes += 1
            await tick(gw)
            ctx = gw.bus.contexts.get(RunId(chatty["runId"]))
            assert ctx is not None, f"emitting run's context swept after {minutes} min"
            assert ctx.seq >= minutes  # one assistant event per minute
            # Silent past the idle TTL, but still executing: held, so its seq cannot restart.
            assert RunId(idle["runId"]) in gw.bus.contexts, minutes
        assert RunId(idle["runId"]) in gw.runs.active  # the idle run itself goes on
        await clock.advance_async(60 * 6, step=60)  # one step per chunk delay
        await wait_for(lambda: RunId(chatty["runId"]) not in gw.subagents.active, "the chatty pipeline")
        await gw.store.flush()
        # Rule 3: a normal end clears the context (and its seq counter, a field of it).
        assert RunId(chatty["runId"]) not in gw.bus.contexts
        rec = await stored(gw, chatty["runId"])
        assert_partial(rec, {"outcome": "ok", "status": "ended"})
        await c.abort(idle["runId"])
        await settle(gw)
        # Its end cleared the held context (rule 3).
        assert RunId(idle["runId"]) not in gw.bus.contexts
    assert gw.registry.sizes()["run_contexts"] == 0
