"""Graceful shutdown: `shutdown` event, drain, exit code 0, and a store that survives the restart.

The gateway runs as a real `clawgate gateway` subprocess (real signals, real SQLite file);
the in-process part checks the same sequence on a RunningGateway.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import websockets

from clawgate.client import Client
from clawgate.server.gateway import Gateway
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, GatewayProcessFactory, make_settings


async def raw_connect(url: str) -> Any:
    ws = await websockets.connect(url, ping_interval=None, open_timeout=5, close_timeout=2)
    assert json.loads(await ws.recv())["event"] == "connect.challenge"
    await ws.send(
        json.dumps(
            {"type": "req", "id": "c", "method": "connect", "params": {"minProtocol": 3, "maxProtocol": 4}}
        )
    )
    assert json.loads(await ws.recv())["ok"] is True
    return ws


async def frames_until_closed(ws: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every frame the server sends until it closes the connection (bounded)."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            out.append(json.loads(await asyncio.wait_for(ws.recv(), max(0.01, deadline - loop.time()))))
    except websockets.exceptions.ConnectionClosed:
        return out


def integrity(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


async def test_sigterm_shutdown_event_drain_exit_0_and_restart(
    tmp_path: Path, gateway_process: GatewayProcessFactory
) -> None:
    state = tmp_path / "state"
    gp = await gateway_process(state).astart()
    async with Client(gp.url, max_reconnect_attempts=0) as c:
        done = await c.run_agent("persist me", idempotency_key="before-sigterm")
        assert done["status"] == "ok"
        watcher = await raw_connect(gp.url)
        # A run still going when the signal comes is let finish (real clock in the subprocess).
        accepted: list[dict[str, Any]] = []
        in_flight = asyncio.create_task(
            c.run_agent("[[delay:0.5]] finishing", idempotency_key="in-flight", on_accepted=accepted.append)
        )
        for _ in range(500):
            if accepted:
                break
            await asyncio.sleep(0.01)
        assert accepted, "run was not accepted"
        t0 = time.monotonic()
        gp.signal(signal.SIGTERM)
        frames = await frames_until_closed(watcher)
        final = await asyncio.wait_for(in_flight, 20)
        assert final["status"] == "ok"
        assert final["result"]["payloads"][0]["text"] == "ok: finishing"
    events = [f for f in frames if f["type"] == "event"]
    assert {"type": "event", "event": "shutdown", "payload": {"reason": "server shutdown"}} in events
    assert watcher.close_code == 1012
    code = await asyncio.to_thread(gp.wait, 30)
    log = gp.log(None)
    assert code == 0, log
    assert time.monotonic() - t0 < 20
    assert "gateway stopped" in log
    assert "Traceback" not in log

    db = state / "clawgate.db"
    assert integrity(db) == "ok"

    # Restart on the same state dir: both runs and the transcript are there.
    gp2 = await gateway_process(state).astart()
    async with Client(gp2.url, max_reconnect_attempts=0) as c:
        for run_id in ("before-sigterm", "in-flight"):
            waited = await c.wait(run_id, 2000)
            assert waited["status"] == "ok"
            assert waited["endedAt"] >= waited["startedAt"]
        history = await c.call("chat.history", {"sessionKey": "agent:main:main"})
        assert [(m["role"], m["content"], m.get("runId")) for m in history["messages"]] == [
            ("user", "persist me", "before-sigterm"),
            ("assistant", "ok: persist me", "before-sigterm"),
            ("user", "[[delay:0.5]] finishing", "in-flight"),
            ("assistant", "ok: finishing", "in-flight"),
        ]
        # The same idempotency key does not start the run again after the restart.
        again = await c.run_agent("persist me", idempotency_key="before-sigterm")
        assert again["status"] == "ok"
        status = await c.status()
        assert status["runs"]["completed"] == 0
    gp2.signal(signal.SIGINT)
    code = await asyncio.to_thread(gp2.wait, 30)
    assert code == 0, gp2.log()
    assert integrity(db) == "ok"


async def test_a_stalled_run_is_ended_within_the_grace(
    tmp_path: Path, gateway_process: GatewayProcessFactory
) -> None:
    state = tmp_path / "state"
    gp = await gateway_process(state, settings={"shutdown_grace_s": 1}).astart()
    async with Client(gp.url, max_reconnect_attempts=0) as c:
        accepted: list[dict[str, Any]] = []
        stalled = asyncio.create_task(
            c.run_agent("[[stall]]", idempotency_key="stalled", on_accepted=accepted.append)
        )
        for _ in range(500):
            if accepted:
                break
            await asyncio.sleep(0.01)
        assert accepted
        t0 = time.monotonic()
        gp.signal(signal.SIGTERM)
        final = await asyncio.wait_for(stalled, 20)
    assert final["status"] == "error"
    assert final["error"] == "gateway shutting down"
    code = await asyncio.to_thread(gp.wait, 30)
    assert code == 0, gp.log()
    assert time.monotonic() - t0 < 15
    gp2 = await gateway_process(state).astart()
    async with Client(gp2.url, max_reconnect_attempts=0) as c:
        waited = await c.wait("stalled", 2000)
    assert waited["status"] == "error"
    assert waited["error"] == "gateway shutting down"
    code, log = await gp2.astop()
    assert code == 0, log


async def test_in_process_stop_sends_shutdown_then_closes(start_gateway: GatewayFactory) -> None:
    rg: RunningGateway = await start_gateway()
    gw = rg.gateway
    ws1 = await raw_connect(rg.url)
    ws2 = await raw_connect(rg.url)
    assert len(gw.connections) == 2
    stopping = asyncio.create_task(rg.stop())
    for ws in (ws1, ws2):
        frames = await frames_until_closed(ws)
        assert frames == [{"type": "event", "event": "shutdown", "payload": {"reason": "server shutdown"}}]
        assert ws.close_code == 1012
    await asyncio.wait_for(stopping, 20)
    assert gw.stopping
    assert not gw.maintenance.running
    assert len(gw.connections) == 0
    assert gw.admit_connection() == "gateway stopping"
    await rg.stop()  # idempotent


async def test_a_stop_step_that_raises_does_not_stop_the_others(
    tmp_path: Path, clock: FakeClock, monkeypatch: Any
) -> None:
    gw = Gateway(make_settings(tmp_path), clock=clock)

    async def broken_stop() -> None:
        raise RuntimeError("disk sampler would not stop")

    # A fault injected into one component's stop, in the middle of the stop order.
    monkeypatch.setattr(gw.disk, "stop", broken_stop)
    rg = RunningGateway(gw)
    await rg.__aenter__()
    try:
        ws = await raw_connect(rg.url)
        await asyncio.wait_for(rg.stop(), 20)
    finally:
        await rg.stop()
    # The steps before it ran, and so did every one after it: connections, store.
    assert not gw.maintenance.running
    frames = await frames_until_closed(ws)
    assert frames == [{"type": "event", "event": "shutdown", "payload": {"reason": "server shutdown"}}]
    assert ws.close_code == 1012
    assert len(gw.connections) == 0
    assert not await gw.store.ping()
    assert [(name, str(exc)) for name, exc in gw.stop_errors] == [("disk", "disk sampler would not stop")]
    await rg.stop()  # idempotent: nothing runs twice
    assert len(gw.stop_errors) == 1
