"""Waiters for runs executed by another process get the run's end even when its "done"
message is lost (pub/sub is at-most-once: a subscriber that reconnects misses what was
published meanwhile). Two gateways in this event loop share the real Redis under a
private prefix and one fake clock; every request crosses a real WebSocket.
"""

from __future__ import annotations

import asyncio

import pytest

from clawgate.client import Client
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, unique_prefix
from helpers import wait_until

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
            clock.advance(5)
            await wait_until(lambda: b.gateway.runs.running == 0, what="B ends the run")
            await b.gateway.store.flush()
            await asyncio.sleep(0.2)
            assert not final.done()
            assert await a.gateway.cluster.reconcile_once() >= 1
            res = await asyncio.wait_for(final, 5)
            assert res["status"] == "ok" and res["runId"] == key
            assert key not in a.gateway.cluster.remote_waiters
