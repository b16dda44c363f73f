"""Agent runs through a real gateway: lanes, concurrency, idempotency, abort, timeout, wait,
provider errors, restart, and the leak test over the state registry.

Time is the gateway's FakeClock: `[[delay:S]]`, run timeouts, `agent.wait` timeouts and
every TTL move only when the test advances it.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from clawgate.client import Client, ClientError
from clawgate.server.gateway import Gateway
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from clawgate.store.records import RunRecord
from clawgate.store.sqlite import SqliteStore
from conftest import GatewayFactory, settle
from helpers import advance_until, poll_until, provider_sleeping, wait_until

# The in-memory structures keyed by run (or by the session lane a run occupies). After a
# batch has ended and its results' TTL has passed, each must be back to its baseline.
RUN_KEYED = (
    "runs_active",  # RunService: a run while queued or running
    "run_results",  # RunService: final records for agent.wait / idempotent retries (TTL)
    "run_contexts",  # EventBus: run context + seq counter
    "run_watchers",  # EventBus: connections following a run
    "session_lanes",  # Lanes: per-session FIFO, only while the session has work
    "lane_workers",  # Lanes: one worker task per non-empty lane
)


async def quiet(rounds: int = 20) -> None:
    """Let every runnable task run for a while (to show that something does NOT happen)."""
    for _ in range(rounds):
        await asyncio.sleep(0.001)


class Lifecycle:
    """Records lifecycle events (run id, phase, data) in arrival order from one client."""

    def __init__(self, client: Client) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.frames: list[dict[str, Any]] = []
        client.on_event = self._on_event

    def _on_event(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        payload = frame.get("payload") or {}
        if frame.get("event") == "agent" and payload.get("stream") == "lifecycle":
            data = payload["data"]
            self.events.append((payload["runId"], data["phase"], data))

    def phases(self, run_id: str) -> list[str]:
        return [phase for rid, phase, _ in self.events if rid == run_id]

    def started(self, run_id: str) -> bool:
        return "start" in self.phases(run_id)

    def ended(self, run_id: str) -> bool:
        return any(
            rid == run_id and phase in ("end", "error") and not data.get("willRetry")
            for rid, phase, data in self.events
        )

    def chat_states(self, run_id: str) -> list[str]:
        return [
            f["payload"]["state"]
            for f in self.frames
            if f.get("event") == "chat" and f["payload"]["runId"] == run_id
        ]


async def submit(client: Client, key: str, message: str, session: str, **extra: Any) -> dict[str, Any]:
    """Send `agent` and return its accepted payload (the final answer is not awaited)."""
    params = {"message": message, "idempotencyKey": key, "sessionKey": session, **extra}
    accepted = await client.call("agent", params)
    assert accepted["status"] == "accepted" and accepted["runId"] == key
    return accepted


def run_keyed(sizes: dict[str, int]) -> dict[str, int]:
    return {name: sizes[name] for name in RUN_KEYED}


# ---------------------------------------------------------------------------------- lanes


async def test_same_session_runs_are_sequential_and_fifo(
    gateway: RunningGateway, client: Client, clock: FakeClock
) -> None:
    gw = gateway.gateway
    life = Lifecycle(client)
    keys = [f"fifo-{i}" for i in range(5)]
    for key in keys:
        await submit(client, key, "[[delay:1]]", "agent:main:fifo")
    for i, key in enumerate(keys):
        await wait_until(lambda key=key: life.started(key), f"start of {key}")
        await quiet()
        assert gw.runs.running == 1
        assert gw.runs.queued == len(keys) - i - 1
        assert [k for k in keys if life.started(k)] == keys[: i + 1]
        # The provider's sleep starts behind the run's history read, after "start".
        await provider_sleeping(clock, 1)
        await clock.advance_async(1)
        await wait_until(lambda key=key: life.ended(key), f"end of {key}")
    expected = list(itertools.chain.from_iterable(((k, "start"), (k, "end")) for k in keys))
    assert [(rid, phase) for rid, phase, _ in life.events] == expected
    await settle(gw)
    for key in keys:
        assert (await client.wait(key))["status"] == "ok"


async def test_sessions_run_concurrently_up_to_main_concurrency(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(main_concurrency=2)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        life = Lifecycle(c)
        keys = [f"conc-{i}" for i in range(4)]
        for i, key in enumerate(keys):
            await submit(c, key, "[[delay:1]]", f"agent:main:conc-{i}")
        await wait_until(lambda: gw.runs.running == 2, "two running")
        await quiet()
        assert gw.runs.running == 2
        assert [k for k in keys if life.started(k)] == keys[:2]
        status = await c.status()
        assert status["runs"]["active"] == 2
        assert status["runs"]["queued"] == 2

        await provider_sleeping(clock, 1, n=2, what="both running runs' provider sleeps")
        await clock.advance_async(1)
        await wait_until(lambda: all(life.started(k) for k in keys), "last two started")
        await quiet()
        assert all(life.ended(k) for k in keys[:2])
        assert not any(life.ended(k) for k in keys[2:])
        status = await c.status()
        assert status["runs"]["active"] == 2 and status["runs"]["queued"] == 0

        await provider_sleeping(clock, 1, n=2, what="the last two runs' provider sleeps")
        await clock.advance_async(1)
        await settle(gw)
        # Never more than two at once, judged from the event order itself.
        running: set[str] = set()
        peak = 0
        for rid, phase, _ in life.events:
            if phase == "start":
                running.add(rid)
            else:
                running.discard(rid)
            peak = max(peak, len(running))
        assert peak == 2
        status = await c.status()
        assert status["runs"]["active"] == 0 and status["runs"]["queued"] == 0
        assert status["runs"]["byStatus"]["ok"] == 4


async def test_a_runs_bookkeeping_writes_do_not_hold_its_slot(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """A run's slot is free once its end is stored and told. The usage ledger's write (one
    more store round trip per run) is queued by its end hook, not awaited in the slot: with
    one main slot, the next run must start while that write cannot complete yet."""
    rg = await start_gateway(main_concurrency=1)
    gw = rg.gateway
    store = gw.store
    assert isinstance(store, SqliteStore)
    release = threading.Event()
    stalled: list[str] = []

    def stall_writer(rec: RunRecord) -> None:
        # An end hook of the test's, called after the ledger's: from here on the store's writer
        # thread waits, so a write the ledger has not queued yet cannot complete.
        if not stalled:
            stalled.append(rec.run_id)
            store.call(lambda _c: release.wait(30))

    gw.runs.on_end(stall_writer)
    try:
        async with Client(rg.url, max_reconnect_attempts=0) as c:
            life = Lifecycle(c)
            await submit(c, "slot-a", "[[delay:1]]", "agent:main:slot-a")
            await submit(c, "slot-b", "hello", "agent:main:slot-b")
            await provider_sleeping(clock, 1)
            assert not life.started("slot-b")  # one slot: b waits for a
            await clock.advance_async(1)
            await wait_until(lambda: life.ended("slot-a"), "the end of a")
            await wait_until(lambda: life.started("slot-b"), "b to start while the writer is stalled", 10)
            assert stalled == ["slot-a"] and not release.is_set()
            release.set()
            await wait_until(lambda: life.ended("slot-b"), "the end of b")
            await settle(gw)
            # Nothing was lost on the way: both runs are in the day's usage.
            cost = await c.call("usage.cost", {"days": 1})
            assert cost["totals"]["runs"] == 2
    finally:
        release.set()


# ---------------------------------------------------------------------------------- idempotency


async def test_idempotency_key_dedupes_while_running_after_end_and_expires(
    gateway: RunningGateway, client: Client, clock: FakeClock
) -> None:
    gw = gateway.gateway
    life = Lifecycle(client)
    session = "agent:main:idem"
    params = {"message": "[[delay:1]][[reply:once]]", "idempotencyKey": "idem-1", "sessionKey": session}

    first = asyncio.create_task(client.call_final("agent", params))
    await wait_until(lambda: life.started("idem-1"), "first start")
    # A retry while the run is going: same run, no second run.
    second = asyncio.create_task(client.call_final("agent", params))
    await wait_until(lambda: len(gw.runs.active["idem-1"].listeners) == 2, "retry joined the run")
    assert await gw.store.count_runs() == 1
    # The provider's sleep starts behind the history read: advance until the run has ended.
    await advance_until(clock, lambda: first.done() and second.done(), "the run to end")
    final1, final2 = first.result(), second.result()
    assert final1["runId"] == final2["runId"] == "idem-1"
    assert final1["status"] == final2["status"] == "ok"
    assert final1["result"] == final2["result"]
    assert life.phases("idem-1") == ["start", "end"]

    # After the end (within dedupe_ttl_s): the cached result, at once, and still one run.
    accepted_at: list[int] = []
    final3 = await client.call_final(
        "agent", params, on_accepted=lambda p: accepted_at.append(p["acceptedAt"])
    )
    assert final3 == final1
    await quiet()
    assert life.phases("idem-1") == ["start", "end"]
    assert await gw.store.count_runs() == 1
    assert gw.runs.totals["ok"] == 1

    # Past dedupe_ttl_s the key is free again: a new run starts under the same id.
    await clock.advance_async(gw.settings.dedupe_ttl_s + 1)
    task = asyncio.create_task(
        client.call_final("agent", params, on_accepted=lambda p: accepted_at.append(p["acceptedAt"]))
    )
    await wait_until(lambda: life.phases("idem-1").count("start") == 2, "second start")
    await provider_sleeping(clock, 1)
    await clock.advance_async(1)
    final4 = await asyncio.wait_for(task, 10)
    assert final4["status"] == "ok"
    assert accepted_at[1] > accepted_at[0]
    assert life.phases("idem-1") == ["start", "end", "start", "end"]
    assert gw.runs.totals["ok"] == 2
    assert await gw.store.count_runs() == 1  # the run id is the key: the row was replaced


async def test_chat_send_shares_run_with_agent_key(gateway: RunningGateway, client: Client) -> None:
    life = Lifecycle(client)
    started = await client.call(
        "chat.send", {"sessionKey": "agent:main:chat", "message": "[[reply:hey]]", "idempotencyKey": "cs-1"}
    )
    assert started == {"runId": "cs-1", "status": "started"}
    done = await client.wait("cs-1")
    assert done["status"] == "ok"
    await wait_until(lambda: "final" in life.chat_states("cs-1"), "chat final")
    assert life.chat_states("cs-1") == ["delta", "final"]
    again = await client.call(
        "chat.send", {"sessionKey": "agent:main:chat", "message": "[[reply:hey]]", "idempotencyKey": "cs-1"}
    )
    assert again == {"runId": "cs-1", "status": "ok"}
    assert await gateway.gateway.store.count_runs() == 1


# ---------------------------------------------------------------------------------- abort / timeout / wait


async def test_abort_running_and_queued_runs_frees_everything(
    gateway: RunningGateway, client: Client, clock: FakeClock
) -> None:
    gw = gateway.gateway
    await settle(gw)
    baseline = run_keyed(gw.registry.sizes())
    life = Lifecycle(client)
    session = "agent:main:abort"
    running = asyncio.create_task(
        client.call_final(
            "agent", {"message": "[[stall]]", "idempotencyKey": "ab-run", "sessionKey": session}
        )
    )
    await wait_until(lambda: life.started("ab-run"), "stalled run start")
    # The run appends its user message after its history read (a store round trip behind the
    # "start" event); the assertion on the transcript below needs it there before the abort.
    await poll_until(
        lambda: gw.store.history(session, 10),
        lambda messages: [m.role for m in messages] == ["user"],
        "the stalled run's user message in the transcript",
    )
    queued = asyncio.create_task(
        client.call_final("agent", {"message": "never", "idempotencyKey": "ab-queued", "sessionKey": session})
    )
    await wait_until(lambda: gw.runs.queued == 1, "second run queued")

    assert await client.abort("ab-queued") == {"runId": "ab-queued", "aborted": True}
    final_q = await asyncio.wait_for(queued, 10)
    assert final_q["status"] == "aborted"
    assert final_q["error"] == "aborted"
    assert not life.started("ab-queued")

    assert await client.abort("ab-run") == {"runId": "ab-run", "aborted": True}
    final_r = await asyncio.wait_for(running, 10)
    assert final_r["status"] == "aborted"
    await wait_until(lambda: life.ended("ab-run"), "lifecycle end")
    end = [data for rid, phase, data in life.events if rid == "ab-run"][-1]
    assert end["phase"] == "end" and end["aborted"] is True
    assert isinstance(end["endedAt"], int)
    assert life.chat_states("ab-run") == ["aborted"]
    # Aborting again is not an error, just not an abort.
    assert await client.abort("ab-run") == {"runId": "ab-run", "aborted": False}

    await settle(gw)
    await quiet()
    assert not life.started("ab-queued")  # it never ran, not even after the lane freed up
    sizes = run_keyed(gw.registry.sizes())
    assert sizes == {**baseline, "run_results": baseline["run_results"] + 2}
    for rid in ("ab-run", "ab-queued"):
        waited = await client.wait(rid)
        assert waited["status"] == "aborted" and "endedAt" in waited
    # Nothing the provider wrote: only the stalled run's user message is in the transcript.
    history = await client.call("chat.history", {"sessionKey": session})
    assert [(m["role"], m["content"]) for m in history["messages"]] == [("user", "[[stall]]")]
    await clock.advance_async(gw.settings.run_result_ttl_s + 1)
    await gw.maintenance.run_once()
    assert run_keyed(gw.registry.sizes()) == baseline


async def test_abort_of_run_waiting_for_global_lane(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(main_concurrency=1, shutdown_grace_s=0)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        life = Lifecycle(c)
        await submit(c, "gl-stall", "[[stall]]", "agent:main:gl-a")
        await wait_until(lambda: life.started("gl-stall"), "stall start")
        await submit(c, "gl-wait", "[[reply:late]]", "agent:main:gl-b")
        await wait_until(lambda: gw.runs.queued == 1, "queued behind the global lane")
        assert (await c.status())["runs"] == {**(await c.status())["runs"], "active": 1, "queued": 1}
        assert (await c.abort("gl-wait"))["aborted"] is True
        assert (await c.wait("gl-wait"))["status"] == "aborted"
        assert gw.runs.queued == 0
        assert (await c.abort("gl-stall"))["aborted"] is True
        await settle(gw)
        await quiet()
        assert not life.started("gl-wait")
        assert gw.runs.totals == {"ok": 0, "error": 0, "timeout": 0, "aborted": 2}


async def test_timeout_ends_stalled_run_and_frees_everything(
    gateway: RunningGateway, client: Client, clock: FakeClock
) -> None:
    gw = gateway.gateway
    await settle(gw)
    baseline = run_keyed(gw.registry.sizes())
    life = Lifecycle(client)
    task = asyncio.create_task(
        client.call_final(
            "agent",
            {"message": "[[stall]]", "idempotencyKey": "to-1", "sessionKey": "agent:main:to", "timeout": 5},
        )
    )
    await wait_until(lambda: life.started("to-1"), "start")
    await clock.advance_async(4.5)
    await quiet()
    assert not task.done()
    await clock.advance_async(0.5)
    final = await asyncio.wait_for(task, 10)
    assert final["status"] == "timeout"
    assert final["error"] == "run timed out"
    assert final["result"]["meta"]["durationMs"] == 5000
    await wait_until(lambda: life.ended("to-1"), "lifecycle error")
    last = [data for rid, phase, data in life.events if rid == "to-1"][-1]
    assert last["phase"] == "error" and last["error"] == "run timed out"
    assert life.chat_states("to-1") == ["error"]
    waited = await client.wait("to-1")
    assert waited["status"] == "timeout" and waited["endedAt"] - waited["startedAt"] == 5000
    await settle(gw)
    assert run_keyed(gw.registry.sizes()) == {**baseline, "run_results": baseline["run_results"] + 1}
    # The timeout timer is gone with the run (no sleeper left behind for it).
    await clock.advance_async(gw.settings.run_result_ttl_s + 1)
    await gw.maintenance.run_once()
    assert run_keyed(gw.registry.sizes()) == baseline


async def test_agent_wait(gateway: RunningGateway, client: Client, clock: FakeClock) -> None:
    gw = gateway.gateway
    done = await client.run_agent("[[reply:fine]]", idempotency_key="w-ok", session_key="agent:main:w")
    assert done["status"] == "ok"
    waited = await client.wait("w-ok")
    assert waited["runId"] == "w-ok" and waited["status"] == "ok"
    assert isinstance(waited["startedAt"], int) and isinstance(waited["endedAt"], int)
    assert waited["endedAt"] >= waited["startedAt"]
    assert "error" not in waited

    life = Lifecycle(client)
    await submit(client, "w-stall", "[[stall]]", "agent:main:w2")
    await wait_until(lambda: life.started("w-stall"), "stall start")
    run = gw.runs.active["w-stall"]
    assert len(run.listeners) == 1  # the `agent` request's own final answer
    pending = asyncio.create_task(client.wait("w-stall", timeout_ms=2000))
    await wait_until(lambda: len(run.listeners) == 2, "waiter registered")
    await clock.advance_async(1.5)
    await quiet()
    assert not pending.done()
    await clock.advance_async(0.5)
    timed_out = await asyncio.wait_for(pending, 10)
    assert timed_out == {"runId": "w-stall", "status": "timeout"}
    assert len(run.listeners) == 1  # the waiter did not stay behind
    # timeoutMs 0: an immediate answer for a running run.
    assert await client.wait("w-stall", timeout_ms=0) == {"runId": "w-stall", "status": "timeout"}

    # A wait that outlives the run gets the run's end.
    pending = asyncio.create_task(client.wait("w-stall", timeout_ms=60_000))
    await wait_until(lambda: len(run.listeners) == 2, "waiter registered")
    await client.abort("w-stall")
    ended = await asyncio.wait_for(pending, 10)
    assert ended["status"] == "aborted" and "endedAt" in ended

    with pytest.raises(ClientError) as info:
        await client.wait("no-such-run")
    assert info.value.code == "NOT_FOUND"
    with pytest.raises(ClientError) as info:
        await client.abort("no-such-run")
    assert info.value.code == "NOT_FOUND"


# ---------------------------------------------------------------------------------- provider errors


async def test_provider_error_ends_run_as_error(gateway: RunningGateway, client: Client) -> None:
    life = Lifecycle(client)
    final = await client.run_agent("[[error:boom]]", idempotency_key="err-1", session_key="agent:main:err")
    assert final["status"] == "error"
    assert final["error"] == "boom" and final["summary"] == "boom"
    assert final["result"]["payloads"] == []
    await wait_until(lambda: life.ended("err-1"), "lifecycle error")
    assert life.phases("err-1") == ["start", "error"]
    last = life.events[-1][2]
    assert last["error"] == "boom" and "willRetry" not in last
    assert life.chat_states("err-1") == ["error"]
    waited = await client.wait("err-1")
    assert waited["status"] == "error" and waited["error"] == "boom"
    # The lane survives the failure: the next run of the session is fine.
    ok = await client.run_agent("[[reply:after]]", idempotency_key="err-2", session_key="agent:main:err")
    assert ok["status"] == "ok"


async def test_retryable_provider_error_is_retried(gateway: RunningGateway, client: Client) -> None:
    life = Lifecycle(client)
    final = await client.run_agent(
        "[[error-once:flaky]][[reply:recovered]]", idempotency_key="retry-1", session_key="agent:main:retry"
    )
    assert final["status"] == "ok"
    assert final["result"]["payloads"][0]["text"] == "recovered"
    await wait_until(lambda: life.ended("retry-1"), "end")
    assert life.phases("retry-1") == ["start", "error", "start", "end"]
    retry = [data for rid, phase, data in life.events if rid == "retry-1"][1]
    assert retry["willRetry"] is True and retry["error"] == "flaky"


async def test_stalled_provider_times_out_with_default_timeout(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(default_run_timeout_s=30)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        task = asyncio.create_task(c.run_agent("[[stall]]", idempotency_key="st-1"))
        await wait_until(lambda: rg.gateway.runs.running == 1, "running")
        await clock.advance_async(30)
        final = await asyncio.wait_for(task, 10)
        assert final["status"] == "timeout"
        await settle(rg.gateway)


# ---------------------------------------------------------------------------------- leak test


async def test_two_thousand_runs_leave_no_run_keyed_state(gateway: RunningGateway, clock: FakeClock) -> None:
    gw = gateway.gateway
    total, clients_n, inflight = 2000, 4, 32
    clients = [Client(gateway.url, max_reconnect_attempts=0) for _ in range(clients_n)]
    for c in clients:
        await c.connect()
    try:
        await settle(gw)
        baseline = gw.registry.sizes()
        assert run_keyed(baseline) == dict.fromkeys(RUN_KEYED, 0)
        gate = asyncio.Semaphore(inflight)
        statuses: list[str] = []

        async def one(i: int) -> None:
            c = clients[i % clients_n]
            # Mixed sessions: 50 sessions, several clients submitting into each one.
            msg = "[[error:bad]]" if i % 97 == 0 else f"[[reply:r{i}]][[chunks:2]]"
            async with gate:
                final = await c.run_agent(
                    msg, idempotency_key=f"leak-{i}", session_key=f"agent:main:leak-{i % 50}"
                )
            statuses.append(final["status"])

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), 90)
        assert len(statuses) == total
        assert statuses.count("error") == len(range(0, total, 97))
        assert statuses.count("ok") == total - statuses.count("error")
        await settle(gw)
        after_batch = gw.registry.sizes()
        # In flight: nothing; results are kept (bounded) until their TTL.
        assert {k: v for k, v in run_keyed(after_batch).items() if k != "run_results"} == {
            k: 0 for k in RUN_KEYED if k != "run_results"
        }
        assert after_batch["run_results"] == total

        await clock.advance_async(gw.settings.run_result_ttl_s + 1)
        await gw.maintenance.run_once()
        status = await clients[0].status()
        assert run_keyed(status["state"]) == run_keyed(baseline)
        assert status["runs"]["completed"] == total
        assert status["state"]["connections"] == baseline["connections"]
        assert status["state"]["background_tasks"] == baseline["background_tasks"]
        assert await gw.store.count_runs() == total
    finally:
        for c in clients:
            await c.close()


# ---------------------------------------------------------------------------------- restart


async def test_queued_runs_survive_restart_and_running_ones_end(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg1 = await start_gateway(main_concurrency=1, shutdown_grace_s=0)
    gw1 = rg1.gateway
    async with Client(rg1.url, max_reconnect_attempts=0) as c:
        life = Lifecycle(c)
        stalled_final = asyncio.create_task(
            c.call_final(
                "agent",
                {"message": "[[stall]]", "idempotencyKey": "rs-stall", "sessionKey": "agent:main:rs-a"},
            )
        )
        await wait_until(lambda: life.started("rs-stall"), "stall start")
        await submit(c, "rs-same-session", "[[reply:same]]", "agent:main:rs-a")
        await submit(c, "rs-other-session", "[[reply:other]]", "agent:main:rs-b")
        await wait_until(lambda: gw1.runs.queued == 2, "two queued")
        await rg1.stop()
        # The running run was ended through the normal path: its owner got the final answer
        # before the connection closed, and its end is durable.
        final = await asyncio.wait_for(stalled_final, 10)
        assert final["status"] == "error" and final["error"] == "gateway shutting down"
    assert not life.started("rs-same-session") and not life.started("rs-other-session")
    assert life.phases("rs-stall") == ["start", "error"]

    rg2 = await start_gateway(main_concurrency=1, shutdown_grace_s=0)
    gw2 = rg2.gateway
    async with Client(rg2.url, max_reconnect_attempts=0) as c2:
        stalled = await c2.wait("rs-stall")
        assert stalled["status"] == "error" and stalled["error"] == "gateway shutting down"
        for rid, text in (("rs-same-session", "same"), ("rs-other-session", "other")):
            done = await c2.wait(rid, timeout_ms=10_000)
            assert done["status"] == "ok", done
            assert "startedAt" in done and "endedAt" in done
            history = await c2.call(
                "chat.history", {"sessionKey": f"agent:main:rs-{'a' if 'same' in rid else 'b'}"}
            )
            assert {"role": "assistant", "content": text, "runId": rid} in [
                {k: m[k] for k in ("role", "content", "runId")} for m in history["messages"]
            ]
        await settle(gw2)
        assert gw2.runs.totals["ok"] == 2


async def test_run_running_at_crash_is_ended_as_interrupted(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "state" / "clawgate.db")
    await store.open()
    now = clock.time()
    await store.put_run(
        RunRecord(
            run_id="crashed-1",
            session_key="agent:main:crash",
            agent_id="main",
            message="was running",
            status="running",
            accepted_at=now - 10,
            started_at=now - 9,
        )
    )
    await store.put_run(
        RunRecord(
            run_id="crashed-queued",
            session_key="agent:main:crash",
            agent_id="main",
            message="[[reply:resumed]]",
            status="queued",
            accepted_at=now - 8,
        )
    )
    await store.close()

    rg = await start_gateway()
    gw: Gateway = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        waited = await c.wait("crashed-1")
        assert waited["status"] == "error"
        assert waited["error"] == "interrupted by gateway restart"
        assert waited["startedAt"] == int((now - 9) * 1000)
        assert waited["endedAt"] == int(now * 1000)
        resumed = await c.wait("crashed-queued", timeout_ms=10_000)
        assert resumed["status"] == "ok"
        await settle(gw)
        stored = await gw.store.get_run("crashed-1")
        assert stored is not None and stored.status == "error"
        assert await gw.store.unfinished_runs() == []


def _write_corrupt_runs(db: Path, now: float) -> None:
    con = sqlite3.connect(db)
    try:
        con.executemany(
            "INSERT INTO runs VALUES (?,?,?,?,?)",
            [
                ("corrupt-open", "agent:main:corrupt", "running", None, b"not json"),
                ("corrupt-done", "agent:main:corrupt", "ok", now - 1, b'{"run_id": 1'),
            ],
        )
        con.commit()
    finally:
        con.close()


async def test_corrupt_run_rows_neither_block_start_nor_stop_the_store(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "clawgate.db"
    store = SqliteStore(db)
    await store.open()  # creates the schema
    await store.close()
    _write_corrupt_runs(db, clock.time())

    rg = await start_gateway()
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        # The corrupt finished row is no run to join: the key starts a fresh run.
        final = await asyncio.wait_for(
            c.run_agent("[[reply:fresh]]", idempotency_key="corrupt-done", session_key="agent:main:corrupt"),
            10,
        )
        assert final["status"] == "ok" and final["result"]["payloads"][0]["text"] == "fresh"
        # And the store's writer is alive for everything after it.
        assert (await asyncio.wait_for(c.wait("corrupt-done"), 10))["status"] == "ok"
        other = await asyncio.wait_for(c.run_agent("[[reply:next]]", idempotency_key="after-corrupt"), 10)
        assert other["status"] == "ok"
        assert await rg.gateway.store.count_runs() == 3


async def test_end_hooks_run_before_the_run_leaves_runs_active(
    gateway: RunningGateway, client: Client
) -> None:
    """Whatever a run's end starts (the subagent pipeline is an end hook) exists by the time the run
    is gone from `runs_active`, so `settle()`-style observers never see a gap."""
    gw = gateway.gateway
    seen: list[tuple[str, str]] = []
    gw.runs.end_hooks.append(lambda rec: seen.append((rec.run_id, rec.status)))
    for i, message in enumerate(("[[reply:ok]]", "[[error:bad]]")):
        rid = f"hook-{i}"
        await submit(client, rid, message, "agent:main:hooks")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while rid in gw.runs.active or not gw.runs.results.get(rid):
            assert loop.time() < deadline
            await asyncio.sleep(0)
        # No await between the check above and this one.
        assert (rid, "ok" if i == 0 else "error") in seen
    await settle(gw)
