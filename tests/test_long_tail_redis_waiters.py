"""Waiters for runs executed by another process get the run's end even when its "done"
message is lost (pub/sub is at-most-once: a subscriber that reconnects misses what was
published meanwhile). Two gateways in this event loop share the real Redis under a
private prefix and one fake clock; every request crosses a real WebSocket.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clawgate.client import Client
from clawgate.events.bus import END_AGENT, END_CHAT
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, unique_prefix
from helpers import provider_sleeping, wait_until

pytestmark = pytest.mark.redis


async def test_agent_retry_waiting_on_another_process_gets_the_end_without_the_done_message(
    start_gateway: GatewayFactory, clock: FakeClock, redis_url: str
) -> None:
    # Long claim idle: the reconcile pass is driven by the test, not by its timer.
    shared = {"store": redis_url, "redis_prefix": unique_prefix(), "cluster_claim_idle_s": 600}
    b = await start_gateway(**shared)
    async with Client(b.url, max_reconnect_attempts=0) as cb:
        key = "lt-waiter-1"
        await cb.call(
            "chat.send",
            {"sessionKey": "agent:main:lt-w", "message": "[[delay:5]] far", "idempotencyKey": key},
        )
        await wait_until(lambda: b.gateway.runs.running == 1, what="B executing the run")
        a = await start_gateway(**shared)
        assert a.gateway.cluster is not None
        async with Client(a.url, max_reconnect_attempts=0) as ca:
            # The same key on A joins the run B executes: A waits for B's end.
            final = asyncio.create_task(ca.run_agent("[[delay:5]] far", idempotency_key=key))
            await wait_until(lambda: key in a.gateway.cluster.remote_waiters, what="A waiting remotely")  # type: ignore[union-attr]
            # A's subscriber is gone when B publishes the end: A never sees the "done".
            await a.gateway.cluster.fanout.stop()
            # B's provider sleep starts behind the run's history read: advance once it sleeps.
            await provider_sleeping(clock, 5)
            clock.advance(5)
            await wait_until(lambda: b.gateway.runs.running == 0, what="B ends the run")
            await b.gateway.store.flush()
            await asyncio.sleep(0.2)
            assert not final.done()
            assert await a.gateway.cluster.reconcile_once() >= 1
            res = await asyncio.wait_for(final, 5)
            assert res["status"] == "ok" and res["runId"] == key
            assert key not in a.gateway.cluster.remote_waiters


async def test_end_events_of_a_run_whose_executor_never_sent_them_are_told_once_from_the_store(
    start_gateway: GatewayFactory, clock: FakeClock, redis_url: str
) -> None:
    """B executes a run and writes its end, then its messages never leave (as when B is
    killed between the end write and the fan-out). A subscriber of all sessions on A used to
    get no terminal event for the run at all; A's reconcile, which settles the run from the
    store, now tells its end events with the seqs B wrote into the record, once: a copy of
    B's own end frames arriving later (B was only late) is dropped."""
    shared = {"store": redis_url, "redis_prefix": unique_prefix(), "cluster_claim_idle_s": 600}
    b = await start_gateway(**shared)
    a = await start_gateway(**shared)
    member_a, member_b = a.gateway.cluster, b.gateway.cluster
    assert member_a is not None and member_b is not None
    seen: list[dict[str, Any]] = []
    key = "lt-told-1"
    async with (
        Client(b.url, max_reconnect_attempts=0) as cb,
        Client(a.url, max_reconnect_attempts=0) as ca,
        Client(a.url, max_reconnect_attempts=0) as watcher,
    ):
        watcher.on_event = lambda frame: (
            seen.append(frame) if frame.get("event") in ("agent", "chat") else None
        )
        await watcher.subscribe(all_sessions=True)
        await cb.call(
            "chat.send",
            {"sessionKey": "agent:main:lt-told", "message": "[[delay:5]] told reply", "idempotencyKey": key},
        )
        await wait_until(lambda: b.gateway.runs.running == 1, what="B executing the run")
        final = asyncio.create_task(ca.run_agent("[[delay:5]] told reply", idempotency_key=key))
        await wait_until(lambda: key in member_a.remote_waiters, what="A waiting remotely")
        await wait_until(lambda: any(f["payload"]["runId"] == key for f in seen), what="B's start event on A")
        await member_b.fanout.stop()  # nothing B sends from now on leaves the process
        # B's provider sleep starts behind the run's history read: advance once it sleeps.
        await provider_sleeping(clock, 5)
        clock.advance(5)
        await wait_until(lambda: b.gateway.runs.running == 0, what="B ends the run")
        await b.gateway.store.flush()
        stored = await a.gateway.store.get_run(key)
        assert stored is not None and stored.status == "ok" and stored.end_seqs is not None

        def ends() -> list[dict[str, Any]]:
            return [
                f
                for f in seen
                if f["payload"]["runId"] == key
                and (
                    (f["event"] == "agent" and f["payload"]["data"].get("phase") in ("end", "error"))
                    or (f["event"] == "chat" and f["payload"]["state"] in ("final", "error", "aborted"))
                )
            ]

        await asyncio.sleep(0.2)
        assert ends() == [] and not final.done()
        assert await member_a.reconcile_once() >= 1
        assert (await asyncio.wait_for(final, 5))["status"] == "ok"
        await wait_until(lambda: len(ends()) == 2, what="the end events told by A")
        agent_end, chat_end = sorted(ends(), key=lambda f: f["event"])
        assert agent_end["payload"]["seq"] == stored.end_seqs[0]
        assert agent_end["payload"]["data"] == {"phase": "end", "endedAt": int(stored.ended_at * 1000)}
        assert chat_end["payload"]["seq"] == stored.end_seqs[1]
        assert chat_end["payload"]["message"]["content"][0]["text"] == stored.result_text
        # Later than every event of the run A saw from B.
        starts = [f for f in seen if f["event"] == "agent" and f["payload"]["runId"] == key]
        assert max(f["payload"]["seq"] for f in starts if f is not agent_end) < agent_end["payload"]["seq"]
        # Told once: another reconcile tells nothing more, and B's own end frames arriving late
        # (here handed to A's member as its fan-out would) are dropped.
        await member_a.reconcile_once()
        member_a._on_event(key, "agent:main:lt-told", b'{"type":"event","event":"agent"}', END_AGENT)
        member_a._on_event(key, "agent:main:lt-told", b'{"type":"event","event":"chat"}', END_CHAT)
        await asyncio.sleep(0.2)
        assert len(ends()) == 2 and member_a.ends_deduped == 2
        assert member_a.describe()["endsDeduped"] == 2
