"""The long tail of runs: seq across long silences, bounded listeners and waiters, refused
subscriptions, and the bounds of `runs_active`, `session_lanes`/`lane_workers` and
`background_tasks`.

Every test talks to a real gateway over a real WebSocket on 127.0.0.1 with the scripted
provider and a FakeClock: `[[delay:S]]` and `[[stall]]` sleep on the gateway clock, and
maintenance ticks are run by hand (`gw.maintenance.run_once()`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from clawgate.client import Client
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


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
        sleepers = clock.pending_sleepers
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
            # The run timeout timer and the provider sleep.
            await wait_until(lambda: clock.pending_sleepers >= sleepers + 2, "the provider's delay")
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
