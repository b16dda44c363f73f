"""Retention of what lives on disk, through a real gateway, real WebSockets and a real SQLite file.

Every rule (docs/disk.md) is driven by the FakeClock and one maintenance pass:
idle sessions, `max_sessions`, transcript bounds (and `chat.history` saying so),
finished runs by age and count, attachments with their session, the start-up
orphan scan, the ended-hook log rotation, SQLite giving pages back, `status` and
`/metrics`, `sessions.cleanup` (admin, dry run) and disk-budget admission.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from clawgate.client import Client, ClientError
from clawgate.retention import policy
from clawgate.server.gateway import Gateway
from clawgate.state.clock import FakeClock
from clawgate.store.sqlite import SCHEMA, SqliteStore
from clawgate.store.trim import transcript_keep
from clawgate.subagents.hooks import JsonlEndedHook, SubagentEnded, log_files
from conftest import GatewayFactory, settle
from helpers import poll_until

QUIET = {"maintenance_interval_s": 10**8, "disk_free_min_bytes": 0}
ADMIN = ["operator.read", "operator.write", "operator.admin"]


def q(gw: Gateway, sql: str) -> Any:
    store = gw.store
    assert isinstance(store, SqliteStore)
    return store._submit(lambda c: c.execute(sql).fetchone()[0])


async def rows(gw: Gateway) -> dict[str, int]:
    await gw.store.flush()
    return await gw.store.table_rows()


async def history(c: Client, key: str) -> dict[str, Any]:
    return await c.call("chat.history", {"sessionKey": key})


async def test_idle_sessions_go_with_their_transcripts_but_not_with_a_run_in_flight(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(session_idle_ttl_s=100, **QUIET)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(3):
            await c.run_agent(f"[[reply:answer {i}]]", session_key=f"agent:main:idle{i}")
        stalled = asyncio.create_task(c.run_agent("[[stall]]", session_key="agent:main:busy", timeout=10_000))
        while not gw.runs.running:
            await asyncio.sleep(0.005)
        await settle_store(gw, "agent:main:busy")
        assert (await rows(gw))["sessions"] == 4
        clock.advance(50)
        await c.run_agent("[[reply:recent]]", session_key="agent:main:recent")
        clock.advance(60)  # idle0..2 and busy are 110 s idle, recent 60 s

        removed = await gw.maintenance.run_once()
        assert removed["retention"] == 3  # sessions; their messages go with them
        kept = {m.key for m in await gw.store.list_sessions(limit=100)}
        assert kept == {"agent:main:busy", "agent:main:recent"}
        left = await rows(gw)
        assert left["sessions"] == 2
        assert left["messages"] == 1 + 2  # busy's question, recent's question and answer
        assert (await history(c, "agent:main:idle0"))["messages"] == []
        assert gw.retention.removed[policy.SESSION_IDLE] == 3
        stalled.cancel()


async def settle_store(gw: Gateway, key: str) -> None:
    """Until the running run in session `key` has its user message in the store: the run
    appends it behind its history read (a store round trip after `runs.running` counts it)."""

    async def stored_roles() -> list[str]:
        await gw.store.flush()
        return [m.role for m in await gw.store.history(key, 10)]

    await poll_until(stored_roles, lambda roles: "user" in roles, f"the user message of {key} stored")


async def test_max_sessions_deletes_the_least_recently_used(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(max_sessions=3, **QUIET)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(5):
            await c.run_agent("[[reply:x]]", session_key=f"agent:main:s{i}")
            clock.advance(1)
        await c.run_agent("[[reply:again]]", session_key="agent:main:s0")  # s0 is now the newest
        report = await gw.retention.run()
    assert report[policy.MAX_SESSIONS] == 2
    kept = {m.key for m in await gw.store.list_sessions(limit=100)}
    assert kept == {"agent:main:s0", "agent:main:s3", "agent:main:s4"}


async def test_transcript_bounds_drop_the_oldest_and_history_says_truncated(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(session_max_messages=4, **QUIET)
    gw = rg.gateway
    key = "agent:main:long"
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(5):
            await c.run_agent(f"[[reply:answer {i}]]", session_key=key)
        before = await history(c, key)
        assert before["truncated"] is False and len(before["messages"]) == 10
        report = await gw.retention.run()
        assert report[policy.TRANSCRIPT] == 6
        after = await history(c, key)
    assert after["truncated"] is True
    assert after["droppedMessages"] == 6
    assert after["messages"] == before["messages"][-4:]


async def test_subagent_announcements_count_toward_the_requester_transcript_bound(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """A requester that only receives its subagents' announcements (a batch that spawns and
    never talks) is trimmed like any transcript: the announcements mark it written."""
    rg = await start_gateway(session_max_messages=4, **QUIET)
    gw = rg.gateway
    requester = "agent:main:spawner"
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        await c.run_agent("[[reply:hi]]", session_key=requester)
        await gw.retention.run()  # the run's two messages: under the bound, and no longer "written"
        for i in range(6):
            spawned = await c.spawn(requester, f"[[reply:child {i}]]", mode="session")
            await c.wait(spawned["runId"], 10_000)
        for _ in range(500):  # the announcements land just after each child's end
            if len((await history(c, requester))["messages"]) >= 8:
                break
            await asyncio.sleep(0.01)
        assert len((await history(c, requester))["messages"]) == 8
        report = await gw.retention.run()
        assert report[policy.TRANSCRIPT] == 4
        after = await history(c, requester)
    assert after["truncated"] is True and len(after["messages"]) == 4
    assert [m["role"] for m in after["messages"]] == ["system"] * 4


async def test_transcript_byte_bound_keeps_the_newest_message(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(session_max_bytes=3000, **QUIET)
    gw = rg.gateway
    key = "agent:main:bytes"
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for _ in range(4):
            await c.run_agent("[[size:1000]]", session_key=key)  # ~1000-byte answers
        await gw.retention.run()
        msgs = (await history(c, key))["messages"]
    total = sum(len(m["content"].encode()) for m in msgs)
    assert total <= 3000
    assert msgs[-1]["role"] == "assistant" and len(msgs[-1]["content"]) == 1000
    assert len(msgs) >= 2


async def test_finished_runs_bounded_by_count_and_age(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(run_retention_max=3, run_retention_s=1000, **QUIET)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        ids = []
        for _i in range(6):
            ids.append((await c.run_agent("[[reply:x]]", session_key="agent:main:runs"))["runId"])
            clock.advance(1)
        report = await gw.retention.run()
        assert report[policy.RUN_MAX] == 3
        assert [await gw.store.get_run(r) is not None for r in ids] == [False] * 3 + [True] * 3
        clock.advance(1001)
        report = await gw.retention.run()
        assert report[policy.RUN_AGE] == 3
    assert (await rows(gw))["runs"] == 0


async def test_a_live_subagent_protects_its_requester_and_child(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(session_idle_ttl_s=100, max_sessions=1, **QUIET)
    gw = rg.gateway
    requester = "agent:main:parent"
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        await c.run_agent("[[reply:hi]]", session_key=requester)
        spawned = await c.spawn(requester, "[[stall]]", mode="session")
        while not gw.runs.running:
            await asyncio.sleep(0.005)
        await settle_store(gw, spawned["childSessionKey"])
        clock.advance(1000)
        report = await gw.retention.run()
    assert report[policy.SESSION_IDLE] == 0 and report[policy.MAX_SESSIONS] == 0
    kept = {m.key for m in await gw.store.list_sessions(limit=10)}
    assert kept == {requester, spawned["childSessionKey"]}


async def test_retained_attachments_go_with_their_session(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(
        session_idle_ttl_s=10_000, retain_attachments_on_keep=True, subagent_session_ttl_s=60, **QUIET
    )
    gw = rg.gateway
    root = gw.subagents.attachments_root
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        att = [{"name": "a.txt", "content": base64.b64encode(b"x" * 5000).decode(), "encoding": "base64"}]
        spawned = await c.spawn("agent:main:req", "[[reply:done]]", mode="session", attachments=att)
        await settle(gw)
        clock.advance(61)
        await gw.maintenance.run_once()  # the subagent sweep removes the record, keeps the files
        assert await gw.store.get_subagent(spawned["runId"]) is None
        assert (root / spawned["runId"] / "a.txt").exists()
        assert 5000 <= gw.retention.attachments_bytes < 6000  # the file and its owner record
        clock.advance(10_000)
        report = await gw.retention.run()
    assert report[policy.ATTACHMENTS] == 1
    assert not (root / spawned["runId"]).exists()
    assert gw.retention.attachments_bytes == 0


async def test_startup_scan_removes_what_a_crash_left(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    rg = await start_gateway(**QUIET)
    gw = rg.gateway
    await rg.stop()
    # A crash between writes: a transcript without its session, attachments without a record.
    db = sqlite3.connect(gw.settings.state_path / "clawgate.db")
    db.execute("INSERT INTO messages(session_key, role, content, ts) VALUES ('agent:main:gone','user','x',1)")
    db.commit()
    db.close()
    orphan = gw.subagents.attachments_root / "run-orphan"
    orphan.mkdir(parents=True)
    (orphan / "f.txt").write_text("left behind")
    rg2 = await start_gateway(**QUIET)
    assert not orphan.exists()
    assert (await rows(rg2.gateway))["messages"] == 0
    assert rg2.gateway.retention.removed[policy.ORPHANS] == 2


def ended(i: int) -> SubagentEnded:
    return SubagentEnded(
        run_id=f"run-{i:05d}",
        child_session_key="agent:main:subagent:x",
        requester_session_key="agent:main:main",
        reason="completed",
        outcome="ok",
        label="",
        mode="run",
        ended_at=1.0,
    )


async def test_ended_hook_log_rotates_by_size_with_a_fixed_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "hooks" / "ended.jsonl"
    hook = JsonlEndedHook(path, max_bytes=2048, backups=2)
    try:
        for i in range(200):
            await hook.on_subagent_ended(ended(i))
    finally:
        hook.close()
    present = [p for p in log_files(path, 2) if p.exists()]
    assert present == log_files(path, 2)
    assert not path.with_name("ended.jsonl.3").exists()
    assert all(p.stat().st_size <= 2048 for p in present)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # The newest lines are in the live file, in order; no line is split across files.
    lines = [ln for p in reversed(present) for ln in p.read_text().splitlines()]
    assert lines[-1].startswith('{"run_id":"run-00199"')
    ids = [int(ln.split('"run-')[1][:5]) for ln in lines]
    assert ids == list(range(ids[0], 200))


async def test_a_store_made_without_auto_vacuum_is_migrated_on_start(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO sessions VALUES ('agent:main:kept','sid',1,1,'other','main',NULL,NULL)")
    db.commit()
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store._submit(lambda c: c.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
        assert (await store.get_session("agent:main:kept")) is not None
    finally:
        await store.close()


async def test_the_file_gives_pages_back_after_retention(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(session_idle_ttl_s=100, **QUIET)
    gw = rg.gateway
    empty = await gw.store.store_bytes()
    for i in range(300):
        gw.sessions.append(f"agent:main:big{i}", "user", "y" * 20_000)  # type: ignore[arg-type]
        await gw.sessions.touch(f"agent:main:big{i}")  # type: ignore[arg-type]
    await gw.store.flush()
    await gw.store.compact()  # checkpoint: the rows are in the main file
    full = await gw.store.store_bytes()
    assert full > 6_000_000
    clock.advance(101)
    await gw.retention.run()
    assert (await rows(gw))["sessions"] == 0
    assert gw.retention.store_bytes < empty + 200_000
    assert gw.retention.compacted_bytes > 5_000_000


async def test_status_and_metrics_show_rows_bytes_and_removals(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(session_idle_ttl_s=100, **QUIET)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        await c.run_agent("[[reply:one]]", session_key="agent:main:a")
        await settle(gw)  # the run's end hooks too (they run after its final answer), then a flush
        disk = (await c.status())["disk"]
        assert disk["rows"] == {"sessions": 1, "messages": 2, "runs": 1, "subagents": 0}
        assert disk["storeBytes"] > 0 and disk["attachmentsBytes"] == 0
        clock.advance(101)
        await gw.maintenance.run_once()
        disk = (await c.status())["disk"]
    assert disk["rows"]["sessions"] == 0 and disk["removed"]["session_idle"] == 1
    async with httpx.AsyncClient(base_url=rg.http_url) as http:
        text = (await http.get("/metrics")).text
    assert 'clawgate_retention_removed_total{rule="session_idle"} 1.0' in text
    assert 'clawgate_store_rows{table="runs"} 1.0' in text
    assert "clawgate_store_bytes " in text and "clawgate_attachments_bytes 0.0" in text


async def test_sessions_cleanup_is_admin_only_and_dry_run_deletes_nothing(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(session_idle_ttl_s=100, session_max_messages=2, **QUIET)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for _i in range(2):
            await c.run_agent("[[reply:x]]", session_key="agent:main:old")
        clock.advance(101)
        await c.run_agent("[[reply:x]]", session_key="agent:main:new")
        await c.run_agent("[[reply:x]]", session_key="agent:main:new")
        with pytest.raises(ClientError) as err:
            await c.call("sessions.cleanup", {})
        assert err.value.code == "FORBIDDEN"
    async with Client(rg.url, max_reconnect_attempts=0, scopes=ADMIN) as admin:
        dry = await admin.call("sessions.cleanup", {"dryRun": True})
        assert dry["dryRun"] is True
        assert dry["removed"]["session_idle"] == 1 and dry["removed"]["transcript_messages"] == 2
        assert (await rows(gw))["sessions"] == 2 and (await rows(gw))["messages"] == 8
        done = await admin.call("sessions.cleanup", {})
        assert done["removed"] == dry["removed"]
        assert done["disk"]["rows"]["sessions"] == 1
    assert (await rows(gw))["messages"] == 2


async def test_disk_budget_refuses_new_work_until_retention_made_room(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(session_idle_ttl_s=100, **QUIET)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(40):
            await c.run_agent("[[size:50000]]", session_key=f"agent:main:fat{i}")
        await gw.store.compact()
        await gw.disk.refresh()
        used = gw.disk.used_bytes
        gw.disk.budget_bytes = used - 500_000  # the settings value, as if configured so
        await gw.disk.refresh()
        with pytest.raises(ClientError) as err:
            await c.run_agent("[[reply:refused]]", session_key="agent:main:late")
        assert err.value.code == "UNAVAILABLE" and err.value.retry_after_ms
        async with httpx.AsyncClient(base_url=rg.http_url) as http:
            assert (await http.get("/readyz")).status_code == 503
            clock.advance(101)
            await gw.maintenance.run_once()  # retention deletes, compacts, re-measures
            assert gw.disk.used_bytes < gw.disk.budget_bytes
            assert (await http.get("/readyz")).status_code == 200
        answer = await c.run_agent("[[reply:admitted]]", session_key="agent:main:late")
    assert answer["status"] == "ok"


async def test_free_space_floor_closes_admission(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(maintenance_interval_s=10**8, disk_free_min_bytes=2**62)
    with pytest.raises(ClientError) as err:
        async with Client(rg.url, max_reconnect_attempts=0) as c:
            await c.run_agent("[[reply:x]]", session_key="agent:main:x")
    assert err.value.code == "UNAVAILABLE"
    assert "diskFreeMinBytes" in err.value.message


def test_every_retention_setting_is_documented() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    disk_doc = (Path(__file__).parent.parent / "docs" / "disk.md").read_text()
    for name in (
        "session_idle_ttl_s",
        "max_sessions",
        "session_max_messages",
        "session_max_bytes",
        "run_retention_s",
        "run_retention_max",
        "ended_hook_log_max_bytes",
        "ended_hook_log_backups",
        "disk_budget_bytes",
        "disk_free_min_bytes",
    ):
        assert name in readme and name in disk_doc, name


async def test_retained_attachments_of_a_run_mode_child_go_with_its_archived_session(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(retain_attachments_on_keep=True, **QUIET)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        att = [{"name": "keep.txt", "content": "kept"}]
        spawned = await c.spawn("agent:main:req", "[[reply:done]]", mode="run", attachments=att)
        await settle(gw)
    folder = gw.subagents.attachments_root / spawned["runId"]
    assert (folder / "keep.txt").exists()
    clock.advance(gw.settings.subagent_archive_after_s + 1)
    removed = await gw.maintenance.run_once()  # the archive deletes the record and the child session
    assert removed["subagent_archive"] == 1
    assert await gw.store.get_session(spawned["childSessionKey"]) is None
    assert not folder.exists()  # nothing refers to the files any more
    assert gw.retention.removed[policy.ATTACHMENTS] == 1


# -- the pure rules (no loop, no store) -------------------------------------------------------------


def test_transcript_keep_counts_messages_and_bytes_newest_first() -> None:
    assert transcript_keep([10, 10, 10], max_messages=5, max_bytes=100) == 3
    assert transcript_keep([10, 10, 10], max_messages=2, max_bytes=100) == 2
    assert transcript_keep([40, 40, 40], max_messages=5, max_bytes=100) == 2
    assert transcript_keep([500, 1], max_messages=5, max_bytes=100) == 1  # the newest stays
    assert transcript_keep([], max_messages=5, max_bytes=100) == 0


def test_deletable_skips_protected_and_respects_the_limit() -> None:
    stamps = [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)]
    assert policy.deletable(stamps, {"b"}, 2) == [("a", 1.0), ("c", 3.0)]
    assert policy.deletable(stamps, set(), 0) == []
    assert policy.lru_excess(12, 10) == 2 and policy.lru_excess(3, 10) == 0


def test_disk_verdict() -> None:
    assert policy.disk_verdict(100, 0, None, 0) is None
    assert "diskBudgetBytes" in (policy.disk_verdict(101, 100, 10**9, 0) or "")
    assert "diskFreeMinBytes" in (policy.disk_verdict(1, 100, 5, 10) or "")
    assert policy.disk_verdict(1, 100, 50, 10) is None


def test_rotation_rule_matches_rotating_file_handler() -> None:
    from clawgate.subagents.hooks import rotation_due

    assert not rotation_due(0, 5000, 1024)  # never rotate an empty file
    assert not rotation_due(1000, 24, 1024)
    assert rotation_due(1000, 25, 1024)
