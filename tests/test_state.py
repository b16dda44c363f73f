"""Bounded state: TTLMap, StateRegistry, Maintenance, the clock, and `status` sizes of a live gateway.

TTLMap tests are synchronous (no event loop): the FakeClock is only read.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from clawgate.client import Client
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock, SystemClock
from clawgate.state.maintenance import Maintenance
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap
from conftest import GatewayFactory, settle

Expired = list[tuple[str, Any, str]]


def make_map(clock: FakeClock, **kw: Any) -> tuple[TTLMap[str, Any], Expired]:
    seen: Expired = []
    m: TTLMap[str, Any] = TTLMap("t", clock, on_expire=lambda k, v, why: seen.append((k, v, why)), **kw)
    return m, seen


def heap_bound(m: TTLMap[Any, Any]) -> int:
    return 2 * len(m) + 1024  # the documented bound on stale heap items between sweeps


# -- TTLMap ----------------------------------------------------------------------------------------
def test_constructor_refuses_an_unbounded_map(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="TTL or a max size"):
        TTLMap("unbounded", clock)


def test_expiry_on_sweep(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    m.set("a", 1)
    m.set("b", 2)
    clock.advance(5)
    m.set("c", 3)
    clock.advance(4.999)
    assert m.sweep() == 0
    assert len(m) == 3
    clock.advance(0.001)  # a and b are exactly at their deadline
    assert m.sweep() == 2
    assert len(m) == 1
    assert sorted(seen) == [("a", 1, "expired"), ("b", 2, "expired")]
    assert m.expired_total == 2
    clock.advance(5)
    assert m.sweep() == 1
    assert seen[-1] == ("c", 3, "expired")
    assert len(m) == 0
    assert m._heap == []


def test_sweep_with_explicit_now(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=10)
    m.set("a", 1)
    assert m.sweep(now=clock.time() + 9) == 0
    assert m.sweep(now=clock.time() + 10) == 1


def test_lazy_expiry_on_read(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    for key in "abcd":
        m.set(key, key.upper())
    clock.advance(10)
    # No sweep: every read path notices the deadline and removes the entry, once.
    assert m.get("a") is None
    assert m.get("b", "dflt") == "dflt"
    assert "c" not in m
    with pytest.raises(KeyError):
        m["d"]
    assert len(m) == 0
    assert sorted(seen) == [
        ("a", "A", "expired"),
        ("b", "B", "expired"),
        ("c", "C", "expired"),
        ("d", "D", "expired"),
    ]
    assert m.sweep() == 0  # nothing left to report twice
    assert len(seen) == 4


def test_read_before_deadline_keeps_the_entry(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    m["a"] = 1
    clock.advance(9.5)
    assert m["a"] == 1
    assert m.get("a") == 1
    assert "a" in m
    assert seen == []


def test_per_entry_ttl(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    m.set("short", 1, ttl_s=2)
    m.set("default", 2)
    m.set("long", 3, ttl_s=100)
    assert m.expires_at("short") == clock.time() + 2
    assert m.expires_at("default") == clock.time() + 10
    assert m.expires_at("missing") is None
    clock.advance(3)
    assert m.sweep() == 1
    assert list(m.keys()) == ["default", "long"]
    clock.advance(10)
    assert m.sweep() == 1
    assert list(m.keys()) == ["long"]
    clock.advance(87)
    assert m.sweep() == 1
    assert [k for k, _, _ in seen] == ["short", "default", "long"]


def test_replacing_an_entry_resets_its_deadline(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    m.set("a", 1)
    clock.advance(8)
    m.set("a", 2)
    clock.advance(8)
    assert m.sweep() == 0
    assert m.get("a") == 2
    m.set("a", 3, ttl_s=1)  # a shorter deadline than the queued heap item
    clock.advance(1)
    assert m.sweep() == 1
    assert seen == [("a", 3, "expired")]


def test_touch_extends_life(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    m.set("a", 1)
    m.set("b", 2)
    clock.advance(8)
    assert m.touch("a") is True
    assert m.expires_at("a") == clock.time() + 10
    clock.advance(8)  # b is past its deadline, a is not
    assert m.sweep() == 1
    assert list(m.keys()) == ["a"]
    clock.advance(1.999)
    assert m.sweep() == 0
    clock.advance(0.001)
    assert m.sweep() == 1
    assert [k for k, _, _ in seen] == ["b", "a"]
    assert m.touch("missing") is False


def test_touch_with_its_own_ttl(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=10)
    m.set("a", 1)
    assert m.touch("a", ttl_s=1000)
    clock.advance(999)
    assert m.sweep() == 0
    assert m.touch("a", ttl_s=0.5)  # shortening works too
    clock.advance(0.5)
    assert m.sweep() == 1


def test_a_map_that_keeps_being_touched_is_never_swept(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=30)
    m.set("busy", 1)
    m.set("idle", 2)
    for _ in range(100):
        clock.advance(20)
        m.touch("busy")
        m.sweep()
    assert list(m.keys()) == ["busy"]
    assert seen == [("idle", 2, "expired")]
    assert len(m._heap) <= 2


def test_lru_eviction_at_max_size(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=100, max_size=3)
    m.set("a", 1)
    m.set("b", 2)
    m.set("c", 3)
    assert m.get("a") == 1  # a is now the most recently used
    m.set("d", 4)
    assert seen == [("b", 2, "evicted")]
    assert list(m.keys()) == ["c", "a", "d"]
    m.touch("c")
    m.set("e", 5)
    assert seen[-1] == ("a", 1, "evicted")
    assert len(m) == 3
    assert m.evicted_total == 2
    assert m.expired_total == 0
    m.set("d", 40)  # replacing never evicts
    assert len(seen) == 2


def test_insertion_order_eviction_without_lru(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=100, max_size=2, lru=False)
    m.set("a", 1)
    m.set("b", 2)
    assert m.get("a") == 1  # no reordering
    m.set("c", 3)
    assert seen == [("a", 1, "evicted")]
    assert list(m.keys()) == ["b", "c"]


def test_size_bound_only_map_never_expires(clock: FakeClock) -> None:
    m, seen = make_map(clock, max_size=2)
    m.set("a", 1)
    clock.advance(10**9)
    assert m.sweep() == 0
    assert m.get("a") == 1
    assert m.expires_at("a") == float("inf")
    assert m._heap == []
    m.set("b", 2)
    m.set("c", 3)
    assert seen == [("a", 1, "evicted")]


def test_pop_remove_clear(clock: FakeClock) -> None:
    m, seen = make_map(clock, ttl_s=10)
    m.set("a", 1)
    m.set("b", 2)
    assert m.pop("a") == 1
    assert m.pop("a", "gone") == "gone"
    m.remove("b")
    m.remove("b")
    assert len(m) == 0
    clock.advance(20)
    assert m.sweep() == 0
    assert seen == []  # popped entries are not reported as expired
    m.set("c", 3)
    m.clear()
    assert len(m) == 0
    assert m._heap == []


def test_items_and_values(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=10)
    m.set("a", 1)
    m.set("b", 2)
    items = m.items()
    m.set("c", 3)  # the iterators are snapshots: mutation while iterating is safe
    assert list(items) == [("a", 1), ("b", 2)]
    assert list(m.values()) == [1, 2, 3]


def test_heap_stays_bounded_under_random_operations(clock: FakeClock) -> None:
    """100k random set/touch/pop/get ops with no sweep: the heap never outgrows the map by much,
    and the map's contents always match a plain model of deadlines.

    The heap is checked against its bound where the map rebuilds it (after a pop that removed
    an entry); in between, an entry expired lazily on read leaves its item until the next push
    or pop, so there the bound is the same formula over the most entries the map has held."""
    rng = random.Random(20260917)
    m, seen = make_map(clock, ttl_s=50)
    model: dict[str, float] = {}
    keys = [f"k{i}" for i in range(300)]
    worst = 0
    peak = 0
    for step in range(100_000):
        key = rng.choice(keys)
        op = rng.random()
        now = clock.time()
        if op < 0.35:
            ttl = rng.choice([None, 1.0, 5.0, 200.0])
            m.set(key, step, ttl_s=ttl)
            model[key] = now + (50 if ttl is None else ttl)
        elif op < 0.65:
            ttl = rng.choice([None, 0.5, 500.0])
            # A touch extends a live entry; one past its deadline is expired, never brought back.
            alive = key in model and model[key] > now
            assert m.touch(key, ttl_s=ttl) is alive
            if alive:
                model[key] = now + (50 if ttl is None else ttl)
            else:
                model.pop(key, None)
        elif op < 0.8:
            popped = m.pop(key)
            model.pop(key, None)
            if popped is not None:
                worst = max(worst, len(m._heap) - heap_bound(m))
        elif op < 0.95:
            value = m.get(key)
            if key in model and model[key] <= now:
                del model[key]
            assert (value is not None) == (key in model)
        else:
            clock.advance(rng.choice([0.1, 1.0, 3.0, 60.0]))
        peak = max(peak, len(m))
        worst = max(worst, len(m._heap) - (2 * peak + 1024))
    assert worst <= 0, f"heap exceeded its bound by {worst}"
    clock.advance(1000)
    removed = m.sweep()
    assert removed == len([k for k, t in model.items() if t <= clock.time()])
    assert len(m) == 0
    assert m._heap == []
    assert m.expired_total == len(seen)


def test_heap_stays_bounded_when_entries_expire_lazily(clock: FakeClock) -> None:
    """Entries set, expired on read and set again, with no sweep in between (no maintenance yet)."""
    m, _ = make_map(clock, ttl_s=1)
    for i in range(20_000):
        m.set(f"k{i % 7}", i)
        clock.advance(2)
        assert m.get(f"k{i % 7}") is None
    assert len(m) == 0
    assert len(m._heap) <= heap_bound(m)


def test_heap_stays_bounded_when_touched_shorter_and_longer(clock: FakeClock) -> None:
    m, _ = make_map(clock, ttl_s=10)
    for i in range(100):
        m.set(f"k{i}", i)
    for _ in range(1000):
        for i in range(100):
            m.touch(f"k{i}", ttl_s=1000)
            m.touch(f"k{i}", ttl_s=1)
        clock.advance(0.0001)
    assert len(m) == 100
    assert len(m._heap) <= heap_bound(m)
    clock.advance(1)
    assert m.sweep() == 100


# -- StateRegistry --------------------------------------------------------------------------------
def test_registry_refuses_unbounded_and_duplicates(clock: FakeClock) -> None:
    reg = StateRegistry()
    with pytest.raises(ValueError, match="neither a TTL nor a bound"):
        reg.add("plain_dict", dict().__len__, ttl_s=None, max_size=None)
    assert "plain_dict" not in reg
    m: TTLMap[str, int] = TTLMap("runs", clock, ttl_s=10, max_size=5)
    reg.register(m, per_run=True)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(m)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("runs", m.__len__, ttl_s=1, max_size=None)
    reg.add_sweep("archive", lambda: 0)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add_sweep("archive", lambda: 0)
    # A structure whose sweep would silently replace an existing sweep of that name.
    clash: TTLMap[str, int] = TTLMap("archive", clock, ttl_s=10)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(clash)
    assert "archive" not in reg
    assert list(reg.sweeps) == ["runs", "archive"]


def test_registry_sizes_tracked_and_sweeps(clock: FakeClock) -> None:
    reg = StateRegistry()
    runs: TTLMap[str, int] = TTLMap("runs", clock, ttl_s=10)
    cache: TTLMap[str, int] = TTLMap("cache", clock, max_size=10)
    conns: set[str] = set()
    reg.register(runs, per_run=True)
    reg.register(cache, per_run=True)
    reg.add("connections", conns.__len__, ttl_s=None, max_size=4)
    runs.set("r1", 1)
    runs.set("r2", 2)
    cache.set("c", 1)
    conns.add("x")
    assert reg.sizes() == {"runs": 2, "cache": 1, "connections": 1}
    assert reg.tracked_entries() == 3
    assert list(reg.sweeps) == ["runs"]  # a size-only map has nothing to sweep
    assert [(r.name, r.ttl_s, r.max_size, r.per_run) for r in reg.describe()] == [
        ("runs", 10, None, True),
        ("cache", None, 10, True),
        ("connections", None, 4, False),
    ]
    reg.sweeps.clear()  # a copy: callers cannot unregister sweeps by accident
    assert list(reg.sweeps) == ["runs"]


def test_register_without_sweep(clock: FakeClock) -> None:
    reg = StateRegistry()
    m: TTLMap[str, int] = TTLMap("m", clock, ttl_s=1)
    reg.register(m, sweep=False)
    assert "m" in reg
    assert reg.sweeps == {}


# -- Maintenance ----------------------------------------------------------------------------------
def make_maintenance(
    clock: FakeClock, interval_s: float = 60.0
) -> tuple[StateRegistry, Maintenance, list[str]]:
    reg = StateRegistry()
    failures: list[str] = []
    return reg, Maintenance(reg, clock, interval_s, on_sweep_error=failures.append), failures


async def test_run_once_runs_every_sweep(clock: FakeClock) -> None:
    reg, maint, failures = make_maintenance(clock)
    a: TTLMap[str, int] = TTLMap("a", clock, ttl_s=5)
    reg.register(a)
    calls: list[str] = []

    def sync_sweep() -> int:
        calls.append("sync")
        return 7

    async def async_sweep() -> int:
        calls.append("async")
        await asyncio.sleep(0)
        return 3

    reg.add_sweep("sync", sync_sweep)
    reg.add_sweep("async", async_sweep)
    reg.add_sweep("no_count", lambda: None)
    a.set("x", 1)
    a.set("y", 2)
    clock.advance(5)
    assert await maint.run_once() == {"a": 2, "sync": 7, "async": 3, "no_count": 0}
    assert calls == ["sync", "async"]
    assert maint.ticks == 1
    assert maint.last_removed == {"a": 2, "sync": 7, "async": 3, "no_count": 0}
    assert maint.errors == {}
    assert failures == []


async def test_a_raising_sweep_is_counted_and_others_still_run(clock: FakeClock) -> None:
    reg, maint, failures = make_maintenance(clock)
    ran: list[str] = []

    def first() -> int:
        ran.append("first")
        return 1

    def boom() -> int:
        ran.append("boom")
        raise RuntimeError("sweep bug")

    async def async_boom() -> int:
        ran.append("async_boom")
        raise KeyError("missing")

    def last() -> int:
        ran.append("last")
        return 2

    for name, fn in [("first", first), ("boom", boom), ("async_boom", async_boom), ("last", last)]:
        reg.add_sweep(name, fn)
    assert await maint.run_once() == {"first": 1, "last": 2}
    assert ran == ["first", "boom", "async_boom", "last"]
    assert maint.errors == {"boom": 1, "async_boom": 1}
    assert failures == ["boom", "async_boom"]
    # Later ticks still run all of them.
    ran.clear()
    assert await maint.run_once() == {"first": 1, "last": 2}
    assert ran == ["first", "boom", "async_boom", "last"]
    assert maint.errors == {"boom": 2, "async_boom": 2}
    assert maint.ticks == 2


async def test_a_raising_error_callback_does_not_break_the_tick(clock: FakeClock) -> None:
    reg = StateRegistry()

    def bad_callback(name: str) -> None:
        raise RuntimeError("metrics down")

    maint = Maintenance(reg, clock, 60, on_sweep_error=bad_callback)
    ran: list[str] = []
    reg.add_sweep("boom", lambda: 1 / 0)
    reg.add_sweep("after", lambda: ran.append("after") or 0)
    await maint.run_once()
    assert ran == ["after"]
    assert maint.errors == {"boom": 1}


async def test_scheduler_runs_with_nothing_to_sweep(clock: FakeClock) -> None:
    """Rule 5: the loop ticks whatever the workload, even with empty structures."""
    reg, maint, _ = make_maintenance(clock, interval_s=60)
    empty: TTLMap[str, int] = TTLMap("session_mode_runs", clock, ttl_s=300)
    reg.register(empty)
    maint.start()
    try:
        assert maint.running
        await asyncio.sleep(0)
        await clock.advance_async(59)
        assert maint.ticks == 0
        await clock.advance_async(1)
        assert maint.ticks == 1
        for expected in range(2, 6):
            await clock.advance_async(60)
            assert maint.ticks == expected
        assert maint.last_removed == {"session_mode_runs": 0}
    finally:
        await maint.stop()
    assert not maint.running


async def test_scheduler_keeps_ticking_past_a_failing_sweep(clock: FakeClock) -> None:
    reg, maint, _ = make_maintenance(clock, interval_s=10)
    m: TTLMap[str, int] = TTLMap("m", clock, ttl_s=15)
    reg.add_sweep("broken", lambda: 1 / 0)
    reg.register(m)
    maint.start()
    try:
        await asyncio.sleep(0)
        m.set("x", 1)
        for _ in range(3):
            await clock.advance_async(10)
        assert maint.ticks == 3
        assert maint.errors == {"broken": 3}
        assert len(m) == 0  # the healthy sweep behind the broken one ran
    finally:
        await maint.stop()


async def test_start_is_idempotent_and_restartable(clock: FakeClock) -> None:
    _reg, maint, _ = make_maintenance(clock, interval_s=10)
    maint.start()
    task = maint._task
    maint.start()
    assert maint._task is task
    await asyncio.sleep(0)
    await clock.advance_async(10)
    assert maint.ticks == 1  # one loop, not two
    await maint.stop()
    await maint.stop()
    await clock.advance_async(50)
    assert maint.ticks == 1
    maint.start()
    await asyncio.sleep(0)
    await clock.advance_async(10)
    assert maint.ticks == 2
    await maint.stop()


# -- clocks ---------------------------------------------------------------------------------------
async def test_fake_clock_sleep_and_timers(clock: FakeClock) -> None:
    fired: list[str] = []
    t1 = clock.call_later(5, lambda: fired.append("t5"))
    clock.call_later(2, lambda: fired.append("t2"))
    cancelled = clock.call_later(3, lambda: fired.append("never"))
    cancelled.cancel()
    sleeper = asyncio.create_task(clock.sleep(4))
    await asyncio.sleep(0)
    assert clock.pending_sleepers == 3
    start = clock.time()
    await clock.advance_async(4)
    assert fired == ["t2"]
    assert sleeper.done()
    assert clock.time() == start + 4
    clock.advance(1)
    assert fired == ["t2", "t5"]
    t1.cancel()  # cancelling a fired timer is harmless
    assert clock.pending_sleepers == 0
    await clock.sleep(0)  # a zero sleep yields, it does not block


async def test_system_clock() -> None:
    sc = SystemClock()
    before_wall, before_mono = time.time(), time.monotonic()
    wall, mono = sc.time(), sc.monotonic()
    assert before_wall <= wall <= time.time()
    assert before_mono <= mono <= time.monotonic()
    # A sleep lasts its delay on the loop's clock: a timer due earlier fires before it ends.
    fired = asyncio.Event()
    sc.call_later(0.001, fired.set)
    await sc.sleep(0.05)
    assert fired.is_set()
    # A negative delay means "now": a sleep or a timer is done within a few loop iterations.
    sleeper = asyncio.create_task(sc.sleep(-1))
    order: list[str] = []
    sc.call_later(0, lambda: order.append("zero"))
    sc.call_later(-1, lambda: order.append("negative"))  # now, so after the earlier "now"
    for _ in range(3):
        await asyncio.sleep(0)
    assert sleeper.done()
    assert order == ["zero", "negative"]


# -- status of a live gateway ---------------------------------------------------------------------
async def test_status_reports_every_structure_with_exact_sizes(
    gateway: RunningGateway, client: Client, clock: FakeClock
) -> None:
    gw = gateway.gateway
    baseline = (await client.status())["state"]
    assert set(baseline) == {r.name for r in gw.registry.describe()}
    for name in (
        "runs_active",
        "run_results",
        "run_contexts",
        "run_watchers",
        "session_lanes",
        "connections",
    ):
        assert name in baseline
    assert baseline["connections"] == 1
    assert baseline["event_sinks"] == 1
    assert baseline["run_results"] == 0

    n = 4
    for i in range(n):
        final = await client.run_agent(f"run {i}", idempotency_key=f"status-{i}")
        assert final["status"] == "ok"
    await settle(gw)
    status = await client.status()
    state = status["state"]
    assert set(state) == set(baseline)
    assert state["run_results"] == n
    assert state["runs_active"] == 0
    assert state["run_contexts"] == 0
    assert state["run_watchers"] == 0
    assert state["session_lanes"] == 0
    assert state["lane_workers"] == 0
    assert state["connections"] == 1
    assert status["runs"] == {
        "active": 0,
        "queued": 0,
        "completed": n,
        "byStatus": {"ok": n, "error": 0, "timeout": 0, "aborted": 0},
    }
    assert status["maintenance"]["running"] is True
    assert status["store"]["kind"] == "sqlite" and status["store"]["up"] is True
    assert status["memory"]["rssBytes"] > 0

    # Results live run_result_ttl_s, then the sweep removes them all.
    await clock.advance_async(gw.settings.run_result_ttl_s - 1)
    await gw.maintenance.run_once()
    assert (await client.status())["state"]["run_results"] == n
    await clock.advance_async(2)
    await gw.maintenance.run_once()
    after = (await client.status())["state"]
    assert after["run_results"] == 0
    assert after == {**baseline, "session_cache": after["session_cache"]}


async def test_gateway_maintenance_ticks_on_its_clock(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(maintenance_interval_s=30)
    gw = rg.gateway
    assert gw.maintenance.running
    start = gw.maintenance.ticks
    loop = asyncio.get_running_loop()
    for k in range(1, 4):
        await clock.advance_async(30)
        deadline = loop.time() + 5
        # The store sweep runs in the SQLite writer thread: wait (bounded) for the tick to end.
        while (gw.maintenance.ticks < start + k or gw.maintenance._lock.locked()) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        assert gw.maintenance.ticks == start + k
    status = await gw.status()
    assert status["maintenance"]["ticks"] == start + 3
    assert status["maintenance"]["sweepErrors"] == {}


async def test_gateway_sweep_error_is_isolated(start_gateway: GatewayFactory, clock: FakeClock) -> None:
    rg = await start_gateway()
    gw = rg.gateway
    gw.registry.add_sweep("broken_for_test", lambda: 1 / 0)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        await c.run_agent("hello", idempotency_key="iso-1")
        await settle(gw)
        await clock.advance_async(gw.settings.run_result_ttl_s + 1)
        await gw.maintenance.run_once()
        status = await c.status()
    assert status["maintenance"]["sweepErrors"]["broken_for_test"] >= 1
    assert status["state"]["run_results"] == 0
