"""Restart: restore, exactly once across a restart (rule 7), the sweeper after restore (rule 5)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from clawgate.runs.service import INTERRUPTED
from clawgate.state.clock import FakeClock
from clawgate.store.records import RunRecord, SessionMeta, SubagentRecord
from clawgate.store.sqlite import SqliteStore
from conftest import GatewayFactory, settle, unique_prefix
from test_subagents import (
    MANUAL_TICKS,
    assert_partial,
    assert_registry_empty,
    blocked_writes,
    connect,
    history,
    hooked,
    spawn,
    stored,
    tick,
    wait_for,
)


def hook_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def write_straight_into_store(
    state_dir: Path, *records: SubagentRecord | RunRecord | SessionMeta
) -> None:
    """What a gateway that died mid-run leaves behind in its SQLite file."""
    store = SqliteStore(state_dir / "clawgate.db")
    await store.open()
    try:
        for rec in records:
            if isinstance(rec, SubagentRecord):
                await store.put_subagent(rec)
            elif isinstance(rec, SessionMeta):
                await store.put_session(rec)
            else:
                await store.put_run(rec)
    finally:
        await store.close()


# -- rule 5 ------------------------------------------------------------------------------------------------
async def test_rule5_sweeper_runs_after_restoring_only_session_mode_records(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """The reference started its sweeper only when a restored record had an archive time, so
    restored session-mode records were never swept. Here the loop alone (no manual tick) sweeps them."""
    first = await start_gateway(**MANUAL_TICKS)
    async with connect(first) as c:
        ids = [(await spawn(c, "agent:main:r5", f"[[reply:{i}]]", mode="session"))["runId"] for i in range(3)]
        await settle(first.gateway)
    await first.stop()

    second = await start_gateway(maintenance_interval_s=60)
    gw = second.gateway
    assert gw.maintenance.running
    assert await gw.store.count_subagents() == 3
    assert_registry_empty(gw)  # all cleaned before the restart: nothing live to restore
    ticks = gw.maintenance.ticks
    for n in range(1, 7):  # 6 minutes: past the 5-minute TTL; the loop ticks once a minute
        before = gw.maintenance.last_removed
        await clock.advance_async(60)
        # A finished tick publishes a new `last_removed`; the loop is then asleep for the next one.
        await wait_for(lambda b=before: gw.maintenance.last_removed is not b, f"tick {n} of the loop")
    assert gw.maintenance.ticks == ticks + 6
    for run_id in ids:
        assert await stored(gw, run_id) is None
    async with connect(second) as c:
        status = await c.status()
    assert status["stored"]["subagent_records"] == 0
    assert status["maintenance"]["running"] is True


# -- rule 7 across a restart ----------------------------------------------------------------------------------
async def test_rule7_exactly_once_across_a_restart_between_end_and_sweep(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    log = tmp_path / "ended.jsonl"
    first = await start_gateway(ended_hook_log=str(log), **MANUAL_TICKS)
    async with connect(first) as c:
        spawned = {
            "run-keep": await spawn(c, "agent:main:r7", "[[reply:a]]"),
            "run-delete": await spawn(c, "agent:main:r7", "[[reply:b]]", cleanup="delete"),
            "session-keep": await spawn(c, "agent:main:r7", "[[reply:c]]", mode="session"),
            "session-delete": await spawn(
                c, "agent:main:r7", "[[reply:d]]", mode="session", cleanup="delete"
            ),
        }
        await settle(first.gateway)
    await first.stop()
    assert len(hook_lines(log)) == 4

    second = await start_gateway(ended_hook_log=str(log), **MANUAL_TICKS)
    gw = second.gateway
    await clock.advance_async(gw.settings.subagent_archive_after_s + 1)
    assert (await tick(gw))["subagent_archive"] == 4
    await tick(gw)
    assert await gw.store.count_subagents() == 0

    lines = hook_lines(log)
    assert Counter(line["run_id"] for line in lines) == {s["runId"]: 1 for s in spawned.values()}
    by_run = {line["run_id"]: line for line in lines}
    expected = {"run-keep": "completed", "run-delete": "deleted", "session-keep": "completed"}
    expected["session-delete"] = "deleted"
    for name, reason in expected.items():
        assert_partial(
            by_run[spawned[name]["runId"]], {"reason": reason, "outcome": "ok", "redelivery": False}
        )


async def test_rule7_a_pipeline_cut_by_a_restart_finishes_once_after_it(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """Stopped while the announce was retrying: the next gateway announces, cleans up, reports once."""
    log = tmp_path / "ended.jsonl"
    first = await start_gateway(ended_hook_log=str(log), **MANUAL_TICKS)
    async with (
        connect(first) as c,
        blocked_writes(tmp_path / "state", "messages", "{row}.role = 'system'"),
    ):
        res = await spawn(c, "agent:main:cut", "[[reply:after restart]]", mode="session")
        await wait_for(lambda: first.gateway.subagents.announce_failures >= 1, "a failed announce")
        await first.stop()
    assert hook_lines(log) == []

    second = await start_gateway(ended_hook_log=str(log), **MANUAL_TICKS)
    gw = second.gateway
    await settle(gw)
    rec = await stored(gw, res["runId"])
    assert_partial(
        rec, {"status": "ended", "outcome": "ok", "ended_reason": "completed", "ended_notified": True}
    )
    async with connect(second) as c:
        announces = [m for m in await history(c, "agent:main:cut") if m["role"] == "system"]
    assert len(announces) == 1 and announces[0]["content"].endswith("after restart")
    await clock.advance_async(gw.settings.subagent_session_ttl_s + 1)
    assert (await tick(gw))["subagent_archive"] == 1
    assert [(line["run_id"], line["reason"]) for line in hook_lines(log)] == [(res["runId"], "completed")]
    assert_registry_empty(gw)


# -- restore of what a dead gateway left running ----------------------------------------------------------------
async def test_a_child_running_when_the_gateway_died_is_finalized_as_interrupted(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    now = clock.time()
    child = "agent:main:subagent:11111111-2222-3333-4444-555555555555"
    await write_straight_into_store(
        state,
        SubagentRecord(
            run_id="dead-run",
            child_session_key=child,
            requester_session_key="agent:main:died",
            task="was working",
            status="running",
            created_at=now - 30,
        ),
        RunRecord(
            run_id="dead-run",
            session_key=child,
            agent_id="main",
            message="was working",
            kind="subagent",
            status="running",
            accepted_at=now - 30,
            started_at=now - 29,
        ),
        # The spawn created the requester's session (announces land only in an existing one).
        SessionMeta(key="agent:main:died", session_id="s-died", created_at=now - 31, updated_at=now - 31),
    )
    log = tmp_path / "ended.jsonl"
    rg = await start_gateway(ended_hook_log=str(log), **MANUAL_TICKS)
    gw = rg.gateway
    hook = hooked(gw)  # appended after start: the pipeline may already be under way, so count the file
    await settle(gw)
    assert_partial(
        await stored(gw, "dead-run"),
        {
            "status": "ended",
            "outcome": "error",
            "error": INTERRUPTED,
            "ended_reason": "completed",
            "ended_notified": True,
            "cleanup_completed_at": clock.time(),
        },
    )
    async with connect(rg) as c:
        main = await history(c, "agent:main:died")
        runs = (await c.call("subagents.list", {"sessionKey": "agent:main:died"}))["runs"]
    assert [m["content"] for m in main] == [f"[subagent dead-run finished: error] {INTERRUPTED}"]
    assert_partial(runs[0], {"runId": "dead-run", "status": "error"})
    lines = hook_lines(log)
    assert [(x["run_id"], x["reason"], x["outcome"], x["redelivery"]) for x in lines] == [
        ("dead-run", "completed", "error", False)
    ]
    assert len(hook.events) <= 1
    assert_registry_empty(gw)
    await clock.advance_async(gw.settings.subagent_archive_after_s + 1)
    assert (await tick(gw))["subagent_archive"] == 1
    assert len(hook_lines(log)) == 1


async def test_restore_requeues_a_child_that_never_started_and_ends_one_without_a_run(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    now = clock.time()
    queued_child = "agent:main:subagent:aaaaaaaa-0000-0000-0000-000000000001"
    orphan_child = "agent:main:subagent:aaaaaaaa-0000-0000-0000-000000000002"
    await write_straight_into_store(
        tmp_path / "state",
        SubagentRecord(
            run_id="queued-run",
            child_session_key=queued_child,
            requester_session_key="agent:main:q",
            task="[[reply:ran after restart]]",
            status="pending",
            created_at=now,
        ),
        RunRecord(
            run_id="queued-run",
            session_key=queued_child,
            agent_id="main",
            message="[[reply:ran after restart]]",
            kind="subagent",
            status="queued",
            accepted_at=now,
        ),
        # Registered, but the gateway died before the run was accepted.
        SubagentRecord(
            run_id="orphan-run",
            child_session_key=orphan_child,
            requester_session_key="agent:main:q",
            task="never ran",
            status="pending",
            created_at=now,
        ),
    )
    log = tmp_path / "ended.jsonl"
    rg = await start_gateway(ended_hook_log=str(log), **MANUAL_TICKS)
    await settle(rg.gateway)
    assert_partial(
        await stored(rg.gateway, "queued-run"), {"outcome": "ok", "frozen_result": "ran after restart"}
    )
    assert_partial(await stored(rg.gateway, "orphan-run"), {"outcome": "error", "error": INTERRUPTED})
    assert Counter(x["run_id"] for x in hook_lines(log)) == {"queued-run": 1, "orphan-run": 1}
    assert_registry_empty(rg.gateway)


async def test_spawn_idempotency_key_survives_a_restart(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    first = await start_gateway(**MANUAL_TICKS)
    async with connect(first) as c:
        original = await spawn(c, "agent:main:idem", "[[reply:x]]", idempotencyKey="restart-key")
        await settle(first.gateway)
    await first.stop()
    second = await start_gateway(**MANUAL_TICKS)
    async with connect(second) as c:
        again = await spawn(c, "agent:main:idem", "[[reply:x]]", idempotencyKey="restart-key")
        await settle(second.gateway)
    assert again == original
    assert await second.gateway.store.count_subagents() == 1


# -- the same registry on the shared Redis store ---------------------------------------------------------------
@pytest.mark.redis
async def test_registry_lifecycle_and_restart_on_redis(
    start_gateway: GatewayFactory, clock: FakeClock, redis_url: str
) -> None:
    """Spawn, cleanup, exactly once across a restart and the TTL sweep, with records in Redis."""
    redis = {"store": redis_url, "redis_prefix": unique_prefix(), **MANUAL_TICKS}
    first = await start_gateway(**redis)
    hook = hooked(first.gateway)
    async with connect(first) as c:
        ids = [
            (await spawn(c, f"agent:main:redis-{i % 2}", f"[[reply:{i}]]", mode="session"))["runId"]
            for i in range(6)
        ]
        await settle(first.gateway)
        runs = (await c.call("subagents.list", {"sessionKey": "agent:main:redis-0"}))["runs"]
    assert sorted(r["runId"] for r in runs) == sorted(ids[0::2])
    assert Counter(e.run_id for e in hook.events) == dict.fromkeys(ids, 1)
    await first.stop()

    second = await start_gateway(**redis)
    gw = second.gateway
    late = hooked(gw)
    assert await gw.store.count_subagents() == 6
    assert_registry_empty(gw)
    await clock.advance_async(gw.settings.subagent_session_ttl_s - 1)
    assert (await tick(gw))["subagent_archive"] == 0
    await clock.advance_async(2)
    assert (await tick(gw))["subagent_archive"] == 6
    assert await gw.store.count_subagents() == 0
    assert late.events == []
