"""The subagent registry on the shared Redis store, with two gateway processes' worth of state.

Two real gateways (each with its own RedisStore on one private key prefix, sharing a FakeClock)
work on the same records in the real Redis: claims keep one record's work in one process, and
conditional writes keep a swept record swept.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from clawgate.server.gateway import Gateway
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from clawgate.store.records import SessionMeta, SubagentRecord, TranscriptMessage
from clawgate.store.redis_store import RedisStore
from clawgate.subagents.hooks import RecordingHook, SubagentEndedHook
from conftest import make_settings, settle, unique_prefix
from test_long_tail_subagents import HungHook
from test_subagents import MANUAL_TICKS, tick, wait_for

pytestmark = pytest.mark.redis


def ended_record(run_id: str, now: float, **fields: Any) -> SubagentRecord:
    """A session-mode record whose pipeline got as far as cleanup, due for the sweep."""
    base: dict[str, Any] = {
        "run_id": run_id,
        "child_session_key": f"agent:main:subagent:{run_id}",
        "requester_session_key": "agent:main:shared",
        "task": "t",
        "mode": "session",
        "status": "ended",
        "outcome": "ok",
        "created_at": now - 400,
        "ended_at": now - 400,
        "announced_at": now - 400,
        "cleanup_completed_at": now - 400,
        "expires_at": now - 1,
    }
    base.update(fields)
    return SubagentRecord(**base)


@pytest.fixture
async def prefix() -> str:
    return unique_prefix()


@pytest.fixture
async def stores(redis_url: str, prefix: str) -> AsyncIterator[Callable[[], Any]]:
    opened: list[RedisStore] = []

    async def make() -> RedisStore:
        store = RedisStore(redis_url, prefix=prefix)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def gateways(
    tmp_path: Path, clock: FakeClock, redis_url: str, prefix: str
) -> AsyncIterator[Callable[..., Any]]:
    """Gateway processes on one Redis prefix; hooks are attached before start (restore runs then)."""
    running: list[RunningGateway] = []

    async def make(name: str, hooks: list[SubagentEndedHook], **overrides: Any) -> Gateway:
        settings = make_settings(tmp_path / name, **{**MANUAL_TICKS, **overrides})
        gw = Gateway(settings, clock=clock, store=RedisStore(redis_url, prefix=prefix))
        gw.subagents.hooks.extend(hooks)
        rg = RunningGateway(gw)
        await rg.__aenter__()
        running.append(rg)
        return gw

    yield make
    for rg in reversed(running):
        await rg.stop()


# -- the store: conditional writes, claims, quarantine ------------------------------------------------------
async def test_an_update_after_a_delete_never_reinserts(stores: Callable[[], Any], clock: FakeClock) -> None:
    a, b = await stores(), await stores()
    rec = ended_record("r-del", clock.time())
    await a.put_subagent(rec)
    await b.delete_subagent("r-del")
    rec.ended_notified = True
    assert await a.update_subagent(rec) is False
    assert await a.get_subagent("r-del") is None
    assert await a.due_subagents(clock.time(), 10) == []
    assert await a.live_subagents() == []


async def test_a_claim_keeps_other_processes_out_until_its_lease_ends(
    stores: Callable[[], Any], clock: FakeClock
) -> None:
    a, b = await stores(), await stores()
    now = clock.time()
    assert await a.claim_subagent("r-claim", "A", now, 60) is False  # no record: nothing to claim
    await a.put_subagent(ended_record("r-claim", now))
    assert await a.claim_subagent("r-claim", "A", now, 60) is True
    assert await b.claim_subagent("r-claim", "B", now + 30, 60) is False
    assert await a.claim_subagent("r-claim", "A", now + 30, 60) is True  # renewed to now + 90
    assert await b.claim_subagent("r-claim", "B", now + 89, 60) is False
    assert await b.claim_subagent("r-claim", "B", now + 91, 60) is True  # A's lease ran out
    await b.release_subagent("r-claim", "A")  # not A's any more: no effect
    assert await a.claim_subagent("r-claim", "A", now + 92, 60) is False
    await b.release_subagent("r-claim", "B")
    assert await a.claim_subagent("r-claim", "A", now + 92, 60) is True
    await a.delete_subagent("r-claim")  # the claim goes with the record
    assert await b.claim_subagent("r-claim", "B", now + 93, 60) is False


async def test_an_undecodable_record_is_quarantined_on_redis(
    stores: Callable[[], Any], clock: FakeClock, redis_url: str, prefix: str
) -> None:
    import redis.asyncio as aioredis

    store = await stores()
    now = clock.time()
    await store.put_subagent(ended_record("bad", now))
    await store.put_subagent(ended_record("good", now))
    raw = aioredis.from_url(redis_url)
    try:
        await raw.set(f"{prefix}:sub:bad", b"{not json", keepttl=True)
        assert [r.run_id for r in await store.due_subagents(now, 10)] == ["good"]
        assert [r.run_id for r in await store.live_subagents()] == ["good"]
        assert await store.get_subagent("bad") is None
        assert store.subagents_quarantined == 1
        assert await raw.get(f"{prefix}:sub:quarantine:bad") == b"{not json"
        assert await raw.ttl(f"{prefix}:sub:quarantine:bad") > 0
        assert not await raw.sismember(f"{prefix}:subs:live", "bad")
        assert await raw.zscore(f"{prefix}:subs:expiry", "bad") is None
    finally:
        await raw.aclose()


async def test_append_to_existing_and_session_depth_on_redis(
    stores: Callable[[], Any], clock: FakeClock
) -> None:
    store = await stores()
    now = clock.time()
    msg = TranscriptMessage(session_key="agent:main:gone", role="system", content="x", ts=now)
    assert await store.append_to_existing(msg) is False
    assert await store.get_session("agent:main:gone") is None
    assert await store.history("agent:main:gone", 10) == []
    child = "agent:main:subagent:deep"
    await store.put_session(SessionMeta(key=child, session_id="s", created_at=now, updated_at=now, depth=2))
    # A touch that does not know the depth never lowers it.
    await store.put_session(SessionMeta(key=child, session_id="s2", created_at=now, updated_at=now + 1))
    meta = await store.get_session(child)
    assert meta is not None and meta.depth == 2
    assert await store.append_to_existing(
        TranscriptMessage(session_key=child, role="system", content="y", ts=now)
    )
    assert [m.content for m in await store.history(child, 10)] == ["y"]


# -- two processes ---------------------------------------------------------------------------------------------
async def test_a_record_another_process_works_on_is_neither_swept_nor_reported_twice(
    gateways: Callable[..., Any], stores: Callable[[], Any], clock: FakeClock
) -> None:
    """A redelivers the ended hook (slowly) for a record that is due; B starts and ticks meanwhile.
    B must not deliver it too, must not sweep it while A works, and A's last write must not
    re-insert a swept row."""
    writer = await stores()
    await writer.put_subagent(ended_record("shared-run", clock.time(), ended_reason="completed"))
    slow = HungHook()
    a = await gateways("a", [slow], ended_hook_timeout_s=10**6)
    await wait_for(lambda: len(slow.events) == 1, "A's redelivery to reach the hook")
    seen_by_b = RecordingHook()
    b = await gateways("b", [seen_by_b], ended_hook_timeout_s=10**6)
    await settle(b)
    assert (await tick(b))["subagent_archive"] == 0
    assert await writer.get_subagent("shared-run") is not None
    slow.release.set()
    await settle(a)
    rec = await writer.get_subagent("shared-run")
    assert rec is not None and rec.ended_notified
    assert (await tick(b))["subagent_archive"] == 1
    await settle(a)
    assert await writer.get_subagent("shared-run") is None
    assert await writer.count_subagents() == 0
    assert [e.redelivery for e in slow.events] == [True]
    assert seen_by_b.events == []


async def test_two_sweeps_at_once_report_a_record_once(
    gateways: Callable[..., Any], stores: Callable[[], Any], clock: FakeClock
) -> None:
    hooks = [RecordingHook(), RecordingHook()]
    a = await gateways("a", [hooks[0]])
    b = await gateways("b", [hooks[1]])
    writer = await stores()
    # Written after both started: neither restored it, only their sweeps meet it.
    for i in range(5):
        await writer.put_subagent(ended_record(f"orphan-{i}", clock.time()))
    for _ in range(2):
        await asyncio.gather(tick(a), tick(b))
        await settle(a)
        await settle(b)
    delivered = [e.run_id for h in hooks for e in h.events]
    assert sorted(delivered) == [f"orphan-{i}" for i in range(5)]
    assert {e.reason for h in hooks for e in h.events} == {"swept"}
    assert await writer.count_subagents() == 0
