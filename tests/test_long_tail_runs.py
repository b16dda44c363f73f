"""The long tail of runs: seq across long silences, bounded listeners and waiters, refused
subscriptions, and the bounds of `runs_active`, `session_lanes`/`lane_workers` and
`background_tasks`.

Every test talks to a real gateway over a real WebSocket on 127.0.0.1 with the scripted
provider and a FakeClock: `[[delay:S]]` and `[[stall]]` sleep on the gateway clock, and
maintenance ticks are run by hand (`gw.maintenance.run_once()`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets

from clawgate.client import Client, ClientError
from clawgate.errors import Unavailable
from clawgate.events.bus import EventBus
from clawgate.ids import ConnId, RunId, SessionKey
from clawgate.runs.lanes import Lanes
from clawgate.runs.slots import Slots
from clawgate.state.clock import FakeClock
from clawgate.state.registry import StateRegistry
from conftest import GatewayFactory, settle
from helpers import wait_until


def events_of(frames: list[dict[str, Any]], event: str, run_id: str) -> list[dict[str, Any]]:
    return [
        f["payload"]
        for f in frames
        if f.get("type") == "event" and f.get("event") == event and f["payload"]["runId"] == run_id
    ]


# -- seq stays contiguous while a run is silent past the idle TTL ------------------------------------
async def test_silent_run_keeps_its_context_and_contiguous_seq(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(run_context_idle_ttl_s=100, shutdown_grace_s=0)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        frames: list[dict[str, Any]] = []
        c.on_event = frames.append
        # One delta every 150 s of gateway time: silent longer than the 100 s idle TTL.
        res = await c.call(
            "agent",
            {
                "message": "[[reply:ab]][[chunks:2]][[delay:150]]",
                "idempotencyKey": "silent-1",
                "sessionKey": "agent:main:silent",
                "timeout": 3600,
            },
        )
        assert res["status"] == "accepted"
        for n in (1, 2):
            # Advance once the provider's sleep has started: a count of pending timers could be
            # met by another timer first, and an advance before the sleep is lost on it.
            due = clock.time() + 150
            await wait_until(lambda due=due: clock.sleeping_until(due) >= 1, "the provider's delay")
            await clock.advance_async(120)  # past the idle TTL, before the next delta
            await gw.maintenance.run_once()
            assert "silent-1" in gw.bus.contexts, "context of an executing run swept"
            await clock.advance_async(30)
            await wait_until(
                lambda n=n: (
                    len([e for e in events_of(frames, "chat", "silent-1") if e["state"] == "delta"]) >= n
                ),
                f"delta {n}",
            )
        await wait_until(lambda: "silent-1" not in gw.runs.active, "the run end")
        await wait_until(
            lambda: any(e["state"] == "final" for e in events_of(frames, "chat", "silent-1")), "chat final"
        )
        agent = events_of(frames, "agent", "silent-1")
        chat = events_of(frames, "chat", "silent-1")
        assert [e["stream"] for e in agent] == ["lifecycle", "assistant", "assistant", "lifecycle"]
        assert [e["seq"] for e in agent] == [1, 2, 3, 4]
        assert [e["state"] for e in chat] == ["delta", "delta", "final"]
        assert [e["seq"] for e in chat] == [1, 2, 3]
        # The end clears the context at once; the hold never outlives the run.
        assert "silent-1" not in gw.bus.contexts
        await settle(gw)
    assert gw.registry.sizes()["run_contexts"] == 0


class FrameSink:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(json.loads(frame))


def test_bus_holds_the_context_of_a_watched_run_and_sweeps_it_once_unwatched() -> None:
    """At the bus alone: a run with watchers has not ended, so its context is not swept however
    idle; an unwatched, unheld context is still swept after the idle TTL (nothing leaks)."""
    clock = FakeClock()
    bus = EventBus(clock, StateRegistry(), idle_ttl_s=1800, max_runs=100, max_connections=10)
    sink = FrameSink()
    run, key = RunId("r1"), SessionKey("agent:main:x")
    bus.attach(ConnId("c1"), sink)
    bus.watch(run, ConnId("c1"), ttl_s=86400)
    bus.register_run(run, key)
    bus.emit_agent(run, key, "lifecycle", {"phase": "start"})
    bus.emit_agent(run, key, "assistant", {"delta": "a"})
    clock.advance(1900)  # silent past the idle TTL, still watched
    assert bus.sweep_contexts() == 0
    bus.emit_agent(run, key, "assistant", {"delta": "b"})
    bus.emit_agent(run, key, "lifecycle", {"phase": "end"})
    assert [f["payload"]["seq"] for f in sink.frames] == [1, 2, 3, 4]
    bus.unwatch_run(run)  # the run's end, without its clear_run (a lost end)
    bus.emit_agent(run, key, "lifecycle", {"phase": "end"})
    clock.advance(1801)
    assert bus.sweep_contexts() == 1
    other = RunId("r2")
    bus.emit_agent(other, key, "lifecycle", {"phase": "start"})  # never watched, never held
    clock.advance(1801)
    assert bus.sweep_contexts() == 1
    assert len(bus.contexts) == 0


# -- listeners and waiters: capped per run and per connection, removed on disconnect ---------------------
def stall(key: str, session: str) -> dict[str, Any]:
    return {"message": "[[stall]]", "idempotencyKey": key, "sessionKey": session, "timeout": 3600}


def waiter_sizes(rg: Any) -> tuple[int, int]:
    sizes = rg.gateway.registry.sizes()
    return sizes["run_waiters"], sizes["waiting_connections"]


async def test_agent_retries_joining_a_run_are_capped_and_leave_with_their_connection(
    start_gateway: GatewayFactory,
) -> None:
    rg = await start_gateway(max_waiters_per_run=3, shutdown_grace_s=0)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as owner:
        assert (await owner.call("agent", stall("join-1", "agent:main:join")))["status"] == "accepted"
        run = gw.runs.active["join-1"]
        assert len(run.listeners) == 1
        retries = [Client(rg.url, max_reconnect_attempts=0) for _ in range(3)]
        for r in retries:
            await r.connect()
        for r in retries[:2]:  # retries of the same key join the running run
            assert (await r.call("agent", stall("join-1", "agent:main:join")))["status"] == "accepted"
        assert len(run.listeners) == 3
        with pytest.raises(ClientError) as info:
            await retries[2].call("agent", stall("join-1", "agent:main:join"))
        assert info.value.code == "UNAVAILABLE" and info.value.retryable
        assert info.value.details == {"runId": "join-1", "maxWaitersPerRun": 3}
        assert len(run.listeners) == 3
        assert waiter_sizes(rg) == (3, 3)
        # The joiners go away without waiting for the end: their listeners go with them.
        for r in retries:
            await r.close()
        await wait_until(lambda: len(run.listeners) == 1, "listeners of closed connections removed")
        assert waiter_sizes(rg) == (1, 1)
        # The run's own answer still arrives, to the connection that is left.
        finals: list[dict[str, Any]] = []
        again = Client(rg.url, max_reconnect_attempts=0)
        await again.connect()
        try:
            waited = asyncio.create_task(again.wait("join-1", timeout_ms=60_000))
            await wait_until(lambda: len(run.listeners) == 2, "a parked wait")
            await owner.abort("join-1")
            finals.append(await asyncio.wait_for(waited, 10))
        finally:
            await again.close()
        assert finals[0]["status"] == "aborted"
        await settle(gw)
    await wait_until(lambda: waiter_sizes(rg) == (0, 0), "no waiter left")


async def test_agent_wait_caps_per_connection_and_per_run_and_removes_cancelled_waits(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(max_waiters_per_connection=4, max_waiters_per_run=6, shutdown_grace_s=0)
    gw = rg.gateway
    async with (
        Client(rg.url, max_reconnect_attempts=0) as owner,
        Client(rg.url, max_reconnect_attempts=0) as w1,
        Client(rg.url, max_reconnect_attempts=0) as w2,
    ):
        await owner.call("agent", stall("cap-1", "agent:main:cap"))
        run = gw.runs.active["cap-1"]
        parked = [asyncio.create_task(w1.wait("cap-1", timeout_ms=60_000)) for _ in range(4)]
        await wait_until(lambda: len(run.listeners) == 5, "four parked waits")
        # Per connection: a fifth wait on w1 is refused, and so is a new run (its answer
        # could not be delivered), before anything is accepted.
        with pytest.raises(ClientError) as info:
            await w1.wait("cap-1", timeout_ms=60_000)
        assert info.value.code == "FORBIDDEN"
        assert info.value.details == {"maxWaitersPerConnection": 4}
        with pytest.raises(ClientError) as info:
            await w1.call("agent", stall("cap-2", "agent:main:cap2"))
        assert info.value.code == "FORBIDDEN"
        assert "cap-2" not in gw.runs.active and await gw.store.get_run("cap-2") is None
        # Per run: 1 (owner) + 4 (w1) + 1 (w2) = 6; the next one is refused, retryable.
        extra = asyncio.create_task(w2.wait("cap-1", timeout_ms=1_000))
        await wait_until(lambda: len(run.listeners) == 6, "the sixth listener")
        with pytest.raises(ClientError) as info:
            await w2.wait("cap-1", timeout_ms=60_000)
        assert info.value.code == "UNAVAILABLE" and info.value.retryable
        assert info.value.details == {"runId": "cap-1", "maxWaitersPerRun": 6}
        # A wait that times out leaves at once, and frees its slot.
        await clock.advance_async(1)
        assert (await asyncio.wait_for(extra, 10))["status"] == "timeout"
        assert len(run.listeners) == 5
        assert waiter_sizes(rg) == (5, 2)
        # w1 disconnects with four parked waits: all four are removed.
        await w1.close()
        await wait_until(lambda: len(run.listeners) == 1, "parked waits of the closed connection removed")
        assert all(isinstance(t.exception(), ClientError) for t in await _done(parked))
        assert waiter_sizes(rg) == (1, 1)
        await owner.abort("cap-1")
        await settle(gw)
    await wait_until(lambda: waiter_sizes(rg) == (0, 0), "no waiter left")


async def _done(tasks: list[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    await asyncio.wait(tasks, timeout=10)
    return tasks


async def test_many_parked_waits_cancelled_leave_nothing_behind(start_gateway: GatewayFactory) -> None:
    """Many parked waits on one run, cancelled by their connections closing: every listener goes,
    the run keeps only its owner's, and the waiter structures return to 0 after the end."""
    rg = await start_gateway(max_waiters_per_connection=200, max_waiters_per_run=2000, shutdown_grace_s=0)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as owner:
        await owner.call("agent", stall("many-1", "agent:main:many"))
        run = gw.runs.active["many-1"]
        clients = [Client(rg.url, max_reconnect_attempts=0) for _ in range(5)]
        for c in clients:
            await c.connect()
        parked = [
            asyncio.create_task(c.wait("many-1", timeout_ms=600_000)) for c in clients for _ in range(200)
        ]
        await wait_until(lambda: len(run.listeners) == 1001, "1000 parked waits", timeout=30)
        assert waiter_sizes(rg) == (1001, 6)
        for c in clients:
            await c.close()
        await wait_until(lambda: len(run.listeners) == 1, "parked waits removed")
        await _done(parked)
        assert waiter_sizes(rg) == (1, 1)
        await owner.abort("many-1")
        await settle(gw)
    await wait_until(lambda: waiter_sizes(rg) == (0, 0), "no waiter left")


# -- session subscriptions: refused at the bound, never evicted ------------------------------------------
async def test_subscriptions_past_the_gateway_bound_are_refused_not_evicted(
    start_gateway: GatewayFactory,
) -> None:
    rg = await start_gateway(max_connections=3, max_session_subscriptions=300)
    gw = rg.gateway
    async with (
        Client(rg.url, max_reconnect_attempts=0) as a,
        Client(rg.url, max_reconnect_attempts=0) as b,
        Client(rg.url, max_reconnect_attempts=0) as owner,
    ):
        seen: list[dict[str, Any]] = []
        a.on_event = seen.append
        await a.subscribe([f"agent:main:a{i}" for i in range(200)])
        # 200 + 150 distinct keys do not fit in 300: refused as a whole, with the bound.
        with pytest.raises(ClientError) as info:
            await b.subscribe([f"agent:main:b{i}" for i in range(150)])
        assert info.value.code == "UNAVAILABLE" and info.value.retryable
        assert info.value.details == {"maxSessionSubscriptions": 300}
        assert gw.registry.sizes()["session_subscriptions"] == 200
        # What fits is accepted; keys already subscribed to by someone else cost nothing.
        await b.subscribe([f"agent:main:b{i}" for i in range(100)])
        await b.subscribe([f"agent:main:a{i}" for i in range(200)])
        assert gw.registry.sizes()["session_subscriptions"] == 300
        with pytest.raises(ClientError):
            await b.subscribe(["agent:main:one-more"])
        assert gw.bus.session_subs.evicted_total == 0
        # A's first subscription still delivers: nobody was dropped to make room.
        await owner.run_agent("[[reply:hi]]", session_key="agent:main:a0", idempotency_key="sub-a0")
        await wait_until(lambda: len(events_of(seen, "agent", "sub-a0")) == 3, "A got the run's events")
    await wait_until(lambda: gw.registry.sizes()["session_subscriptions"] == 0, "subscriptions released")


# -- runs_active: refused at max_tracked_runs, never evicted ---------------------------------------------
async def test_runs_past_max_tracked_runs_are_refused_not_evicted(start_gateway: GatewayFactory) -> None:
    """Concurrent spawns all pass the admission check, then await the store before their run is
    tracked: the ones that no longer fit are refused, and no live run is evicted to make room."""
    rg = await start_gateway(max_tracked_runs=3, shutdown_grace_s=0)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(2):
            await c.call("agent", stall(f"tracked-{i}", f"agent:main:tracked{i}"))
        results = await asyncio.gather(
            *(c.spawn("agent:main:main", "[[stall]]", runTimeoutSeconds=3600) for _ in range(5)),
            return_exceptions=True,
        )
        accepted = [r["runId"] for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, ClientError)]
        assert len(accepted) + len(refused) == 5, results
        assert len(accepted) == 1
        assert all(e.code == "UNAVAILABLE" and e.retryable for e in refused)
        assert gw.runs.active.evicted_total == 0
        live = set(gw.runs.active.keys())
        assert live == {"tracked-0", "tracked-1", *accepted}
        # Every accepted run is still reachable: abort finds it, and it ends.
        for run_id in live:
            assert (await c.abort(run_id))["aborted"] is True
        await settle(gw)
        for run_id in live:
            assert (await c.wait(run_id, timeout_ms=0))["status"] == "aborted"


async def test_queued_runs_past_max_tracked_runs_end_visibly_on_restore(
    start_gateway: GatewayFactory,
) -> None:
    rg1 = await start_gateway(main_concurrency=1, shutdown_grace_s=0)
    async with Client(rg1.url, max_reconnect_attempts=0) as c:
        await c.call("agent", stall("rq-stall", "agent:main:rq-s"))
        await wait_until(lambda: rg1.gateway.runs.running == 1, "the stall runs")
        for i in range(4):
            params = {
                "message": "[[reply:done]]",
                "idempotencyKey": f"rq-{i}",
                "sessionKey": f"agent:main:rq{i}",
            }
            await c.call("agent", params)
        await wait_until(lambda: rg1.gateway.runs.queued == 4, "four queued")
        await rg1.stop()
    rg2 = await start_gateway(main_concurrency=1, max_tracked_runs=2, shutdown_grace_s=0)
    gw2 = rg2.gateway
    assert gw2.runs.active.evicted_total == 0
    async with Client(rg2.url, max_reconnect_attempts=0) as c2:
        finals = [await c2.wait(f"rq-{i}", timeout_ms=10_000) for i in range(4)]
        statuses = sorted((f["status"], f.get("error")) for f in finals)
        assert statuses == [
            ("error", "not re-queued after restart: maxTrackedRuns reached"),
            ("error", "not re-queued after restart: maxTrackedRuns reached"),
            ("ok", None),
            ("ok", None),
        ]
        await settle(gw2)
    assert gw2.runs.active.evicted_total == 0


# -- session lanes and their workers: the declared bound is enforced ---------------------------------------
async def test_lanes_refuse_a_new_session_past_max_lanes_and_never_run_a_session_twice() -> None:
    registry = StateRegistry()
    release = asyncio.Event()
    running: dict[str, int] = {}
    most_at_once: dict[str, int] = {}
    done: list[str] = []

    async def execute(item: tuple[str, int]) -> None:
        key = item[0]
        running[key] = running.get(key, 0) + 1
        most_at_once[key] = max(most_at_once.get(key, 0), running[key])
        await release.wait()
        running[key] -= 1
        done.append(f"{key}/{item[1]}")

    lanes: Lanes[tuple[str, int]] = Lanes(
        FakeClock(), registry, max_lanes=2, execute=execute, on_task_error=lambda exc: None
    )
    a, b, c = SessionKey("agent:main:a"), SessionKey("agent:main:b"), SessionKey("agent:main:c")
    lanes.push(a, ("a", 1))
    lanes.push(b, ("b", 1))
    while sum(running.values()) < 2:  # both workers are executing their first item
        await asyncio.sleep(0.001)
    lanes.push(a, ("a", 2))  # an existing lane takes more work
    try:
        lanes.push(c, ("c", 1))
    except Unavailable as exc:
        assert exc.details == {"maxLanes": 2}
    else:
        raise AssertionError("a third lane was accepted past max_lanes=2")
    assert not lanes.has_room(c)
    assert lanes.queued == 1  # ("a", 2); the refused item was not counted
    # Pushing to `a` again must reach the same lane, not a second worker for the session.
    lanes.push(a, ("a", 3))
    sizes = registry.sizes()
    assert sizes["session_lanes"] == 2 and sizes["lane_workers"] == 2
    assert {d.name: d.max_size for d in registry.describe()}["lane_workers"] == 2
    release.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while lanes.workers and loop.time() < deadline:
        await asyncio.sleep(0.001)
    assert sorted(done) == ["a/1", "a/2", "a/3", "b/1"]
    assert [d for d in done if d.startswith("a/")] == ["a/1", "a/2", "a/3"]  # FIFO per session
    assert most_at_once == {"a": 1, "b": 1}
    assert registry.sizes()["session_lanes"] == registry.sizes()["lane_workers"] == 0
    assert lanes.has_room(c)


async def test_lanes_wait_for_a_global_slot_in_fifo_order_without_a_worker_task() -> None:
    """A lane queued for a global slot has no task; slots go to lanes (and to callers of
    `Slots.acquire`) in the order they queued; a lane's next run queues behind the others;
    an item removed while waiting leaves no trace; main and subagent slots are apart."""
    registry = StateRegistry()
    pools = {"main": Slots(1), "sub": Slots(1)}
    gates: dict[str, asyncio.Event] = {}
    order: list[str] = []

    async def execute(item: tuple[str, str]) -> None:
        order.append(item[0])
        gate = gates[item[0]] = asyncio.Event()
        await gate.wait()

    lanes: Lanes[tuple[str, str]] = Lanes(
        FakeClock(),
        registry,
        max_lanes=10,
        execute=execute,
        on_task_error=lambda exc: None,
        slots=lambda item: pools[item[1]],
    )

    def key(name: str) -> SessionKey:
        return SessionKey(f"agent:main:{name}")

    async def finish(name: str) -> None:
        await wait_until(lambda: name in gates)
        gates[name].set()

    lanes.push(key("a"), ("a1", "main"))
    await wait_until(lambda: order == ["a1"])
    lanes.push(key("b"), ("b1", "main"))
    lanes.push(key("a"), ("a2", "main"))
    lanes.push(key("x"), ("x1", "main"))  # removed while it waits
    lanes.push(key("c"), ("c1", "main"))
    lanes.push(key("s"), ("s1", "sub"))  # its own pool: starts at once
    await wait_until(lambda: order == ["a1", "s1"])
    assert len(lanes.workers) == 2  # the waiting lanes b, x, c have no task
    assert lanes.queued == 4
    assert lanes.remove(key("x"), ("x1", "main"))
    assert key("x") not in lanes.lanes and lanes.queued == 3
    direct = asyncio.create_task(pools["main"].acquire())  # queued after c
    await finish("a1")
    await finish("b1")
    await finish("c1")
    await asyncio.wait_for(direct, 5)  # before a2, which queued behind it when a1 ended
    assert order == ["a1", "s1", "b1", "c1"]
    pools["main"].release()
    await finish("a2")
    await finish("s1")
    await wait_until(lambda: not lanes.workers)
    assert order == ["a1", "s1", "b1", "c1", "a2"]
    assert lanes.queued == 0 and len(lanes.lanes) == 0
    assert pools["main"].free == pools["sub"].free == 1


# -- background tasks: never more than two per live connection ----------------------------------------------
async def test_background_close_tasks_never_outlive_their_connection(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(max_connections=4, handshake_timeout_s=1)
    gw = rg.gateway
    declared = {d.name: d.max_size for d in gw.registry.describe()}
    assert declared["background_tasks"] == 2 * gw.settings.max_connections
    for _round in range(3):
        idle = [await websockets.connect(rg.url, ping_interval=None, close_timeout=2) for _ in range(4)]
        for ws in idle:
            await ws.recv()  # the challenge; no connect follows
        await wait_until(lambda: len(gw.connections) == 4, "four pending connections")
        clock.advance(1)  # every handshake times out: each connection starts a close task
        most = len(gw.background)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while gw.connections or gw.background:
            assert len(gw.background) <= 2 * len(gw.connections), (len(gw.background), len(gw.connections))
            most = max(most, len(gw.background))
            assert loop.time() < deadline, "connections did not close"
            await asyncio.sleep(0)
        assert most == 4  # the close tasks did exist, and went with their connections
        for ws in idle:
            await ws.close()
    assert gw.registry.sizes()["background_tasks"] == 0


class _Counted:
    """A queued thing that counts the equality checks made against it."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _Counted.compared += 1
        return self is other

    __hash__ = object.__hash__


class _CountedWaiter(_Counted):
    def granted(self, slots: Slots) -> bool:
        return True


async def test_aborting_many_queued_runs_in_any_order_costs_no_scan_of_the_queue() -> None:
    """An abort takes a queued run out of its session lane, and a lane out of the global slot
    queue. Both were deques whose `remove` compares against every entry before the one
    removed: aborting n queued sessions (or n runs of one session) in reverse order cost
    n^2 / 2 comparisons, which for a batch of 20,000 blocks the event loop for seconds."""
    n = 2000
    slots = Slots(1)
    await slots.acquire()  # held: everyone below queues
    waiters = [_CountedWaiter() for _ in range(n)]
    for w in waiters:
        slots.request(w)
    _Counted.compared = 0
    for w in reversed(waiters[1:]):  # out of order: the newest first, the oldest stays queued
        assert slots.cancel(w)
    assert _Counted.compared < n  # a scan per cancel would be ~n^2 / 2 = 2,000,000
    assert not slots.cancel(waiters[-1])  # gone once
    assert slots.contended
    slots.release()  # to the one left
    assert not slots.contended
    slots.release()  # which is done with it

    # One session's lane: runs aborted newest first, then oldest first.
    lanes: Lanes[_Counted] = Lanes(
        FakeClock(),
        StateRegistry(),
        max_lanes=10,
        execute=lambda item: asyncio.sleep(0),
        on_task_error=lambda exc: None,
        slots=lambda item: slots,
    )
    await slots.acquire()  # held again: the lane waits for a slot with all its runs queued
    key = SessionKey("agent:main:one")
    items = [_Counted() for _ in range(n)]
    for item in items:
        lanes.push(key, item)
    assert lanes.queued == n
    _Counted.compared = 0
    for item in reversed(items[n // 2 :]):
        assert lanes.remove(key, item)
    for item in items[: n // 2]:
        assert lanes.remove(key, item)
    assert _Counted.compared < n
    assert lanes.queued == 0 and key not in lanes.lanes
    assert not slots.contended  # the emptied lane left the slot queue too
