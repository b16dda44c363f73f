"""Event streaming over a real WebSocket: `agent` / `chat` events, seq, fan-out, run contexts.

Every test runs a real gateway on 127.0.0.1 with the scripted provider and a
FakeClock; `[[delay:S]]` sleeps on the gateway clock, so `clock.advance_async(S)`
releases it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets

from clawgate.client import Client, ClientError
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle
from helpers import provider_sleeping, wait_until


class RawConn:
    """A bare websockets client speaking the protocol by hand (no clawgate.client involved)."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str) -> RawConn:
        ws = await websockets.connect(url, ping_interval=None)
        conn = cls(ws)
        challenge = await conn.recv()
        assert challenge["type"] == "event" and challenge["event"] == "connect.challenge"
        await conn.send(
            {
                "type": "req",
                "id": "hello",
                "method": "connect",
                "params": {
                    "minProtocol": 3,
                    "maxProtocol": 4,
                    "client": {"id": "raw-test", "version": "1", "platform": "test", "mode": "cli"},
                    "role": "operator",
                    "scopes": ["operator.read", "operator.write"],
                },
            }
        )
        hello = await conn.recv()
        assert hello["id"] == "hello" and hello["ok"] is True, hello
        return conn

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), 10)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def close(self) -> None:
        await self.ws.close()


def agent_events(frames: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [
        f["payload"]
        for f in frames
        if f.get("type") == "event" and f.get("event") == "agent" and f["payload"]["runId"] == run_id
    ]


def chat_events(frames: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [
        f["payload"]
        for f in frames
        if f.get("type") == "event" and f.get("event") == "chat" and f["payload"]["runId"] == run_id
    ]


async def test_agent_two_responses_share_request_id_and_stream_events(gateway: RunningGateway) -> None:
    conn = await RawConn.open(gateway.url)
    try:
        await conn.send(
            {
                "type": "req",
                "id": "req-42",
                "method": "agent",
                "params": {
                    "message": "[[reply:abcdef]][[chunks:3]]",
                    "idempotencyKey": "ev-run-1",
                    "sessionKey": "agent:main:events",
                    "deliver": False,  # OpenClaw extra: ignored
                },
            }
        )
        frames: list[dict[str, Any]] = []
        responses: list[dict[str, Any]] = []
        while len(responses) < 2:
            frame = await conn.recv()
            frames.append(frame)
            if frame["type"] == "res":
                responses.append(frame)
    finally:
        await conn.close()

    accepted, final = responses
    assert accepted["id"] == "req-42" and final["id"] == "req-42"
    assert accepted["ok"] and final["ok"]
    assert accepted["payload"]["status"] == "accepted"
    assert accepted["payload"]["runId"] == "ev-run-1"
    assert accepted["payload"]["sessionKey"] == "agent:main:events"
    assert accepted["payload"]["agentId"] == "main"
    assert isinstance(accepted["payload"]["acceptedAt"], int)
    assert final["payload"]["runId"] == "ev-run-1"
    assert final["payload"]["status"] == "ok"
    assert final["payload"]["summary"] == "completed"
    assert final["payload"]["result"]["payloads"] == [{"text": "abcdef", "mediaUrl": None}]

    events = agent_events(frames, "ev-run-1")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["sessionKey"] == "agent:main:events" for e in events)
    assert events[0]["stream"] == "lifecycle" and events[0]["data"]["phase"] == "start"
    assert isinstance(events[0]["data"]["startedAt"], int)
    assert events[-1]["stream"] == "lifecycle" and events[-1]["data"]["phase"] == "end"
    assert "aborted" not in events[-1]["data"]
    assistant = [e["data"] for e in events if e["stream"] == "assistant"]
    assert assistant == [
        {"delta": "ab", "text": "ab"},
        {"delta": "cd", "text": "abcd"},
        {"delta": "ef", "text": "abcdef"},
    ]
    # Only lifecycle start, three deltas, lifecycle end: nothing else slipped in.
    assert len(events) == 5

    chats = chat_events(frames, "ev-run-1")
    assert [c["state"] for c in chats] == ["delta", "delta", "delta", "final"]
    assert [c["seq"] for c in chats] == [1, 2, 3, 4]
    assert [c.get("deltaText") for c in chats[:3]] == ["ab", "cd", "ef"]
    assert chats[-1]["message"]["role"] == "assistant"
    assert chats[-1]["message"]["content"] == [{"type": "text", "text": "abcdef"}]

    # Every event of the run came before its final response on the wire.
    final_index = frames.index(final)
    assert all(frames.index(f) < final_index for f in frames if f.get("event") in ("agent", "chat"))
    await settle(gateway.gateway)
    sizes = gateway.gateway.registry.sizes()
    assert sizes["run_contexts"] == 0 and sizes["run_watchers"] == 0


async def test_events_only_reach_owner_and_subscribers(gateway: RunningGateway) -> None:
    key = "agent:main:fanout"
    async with (
        Client(gateway.url, max_reconnect_attempts=0) as owner,
        Client(gateway.url, max_reconnect_attempts=0) as subscriber,
        Client(gateway.url, max_reconnect_attempts=0) as other_session,
        Client(gateway.url, max_reconnect_attempts=0) as bystander,
    ):
        seen: dict[str, list[dict[str, Any]]] = {"owner": [], "sub": [], "other": [], "by": []}
        owner.on_event = seen["owner"].append
        subscriber.on_event = seen["sub"].append
        other_session.on_event = seen["other"].append
        bystander.on_event = seen["by"].append
        await subscriber.subscribe([key])
        await other_session.subscribe(["agent:main:somewhere-else"])

        final = await owner.run_agent("[[reply:xyz]]", session_key=key, idempotency_key="fan-1")
        assert final["status"] == "ok"
        # The subscriber gets the same agent events as the owner (its frames are queued before the
        # owner's final response only on the owner's socket), so wait for its lifecycle end.
        await wait_until(
            lambda: any(e["data"].get("phase") == "end" for e in agent_events(seen["sub"], "fan-1")),
            "subscriber lifecycle end",
        )
        owner_events = agent_events(seen["owner"], "fan-1")
        assert [e["seq"] for e in owner_events] == [1, 2, 3]
        assert agent_events(seen["sub"], "fan-1") == owner_events
        assert [c["state"] for c in chat_events(seen["sub"], "fan-1")] == ["delta", "final"]
        # A ping round trip on each socket, so anything misrouted would have arrived by now.
        await other_session.call("health")
        await bystander.call("health")
        assert agent_events(seen["other"], "fan-1") == []
        assert agent_events(seen["by"], "fan-1") == []
        assert chat_events(seen["by"], "fan-1") == []


async def test_all_subscriber_sees_runs_of_other_connections(gateway: RunningGateway) -> None:
    async with (
        Client(gateway.url, max_reconnect_attempts=0) as owner,
        Client(gateway.url, max_reconnect_attempts=0) as watcher,
    ):
        seen: list[dict[str, Any]] = []
        watcher.on_event = seen.append
        await watcher.subscribe(all_sessions=True)
        await owner.run_agent("hi", session_key="agent:ops:any", idempotency_key="all-1")
        await wait_until(lambda: len(agent_events(seen, "all-1")) == 3, "3 agent events")
        assert [e["stream"] for e in agent_events(seen, "all-1")] == ["lifecycle", "assistant", "lifecycle"]


async def test_emitting_and_silent_runs_keep_context_watchers_and_seq(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """Rule 2: a run that keeps emitting is never swept, and its owner keeps receiving its events
    however long it runs. A run silent for longer than run_context_idle_ttl_s keeps its context
    too while it executes (held until the run's backstop), so its seq never restarts at 1."""
    rg = await start_gateway(run_context_idle_ttl_s=100, shutdown_grace_s=0)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        frames: list[dict[str, Any]] = []
        c.on_event = frames.append
        # The gateway's maintenance loop also sleeps until 60 s from now: counted first, so the
        # first advance waits for the busy run's own first delay (see below).
        loop_sleeps = clock.sleeping_until(clock.time() + 60)
        # Emits one delta every 60 s of gateway time for 5 minutes: never idle for 100 s.
        busy = await c.call(
            "agent",
            {
                "message": "[[reply:abcde]][[chunks:5]][[delay:60]]",
                "idempotencyKey": "long-busy",
                "sessionKey": "agent:main:busy",
                "timeout": 3600,
            },
        )
        # Says nothing after its start until it is aborted.
        quiet = await c.call(
            "agent",
            {
                "message": "[[stall]]",
                "idempotencyKey": "long-quiet",
                "sessionKey": "agent:main:quiet",
                "timeout": 3600,
            },
        )
        assert busy["status"] == quiet["status"] == "accepted"
        await wait_until(lambda: len(gw.bus.contexts) == 2, "two run contexts")
        # The first delay starts behind the run's history read, after its context exists: an
        # advance before it would be lost on it. (Each later delay starts in the step that emits
        # the delta before it, so it has started once the client has that delta.)
        await provider_sleeping(clock, 60, n=loop_sleeps + 1, what="the busy run's first delay")

        def deltas_seen() -> int:
            return sum(1 for e in agent_events(frames, "long-busy") if e["stream"] == "assistant")

        for step in range(1, 6):
            await clock.advance_async(60)
            await wait_until(lambda n=step: deltas_seen() >= n, f"delta {step}")
            await gw.maintenance.run_once()
            if step < 5:  # the fifth delta is the last: then the run ends and clears its context
                assert "long-busy" in gw.bus.contexts
            # 120 s and more without an event: still executing, so its context is held.
            assert "long-quiet" in gw.bus.contexts
        await wait_until(lambda: "long-busy" not in gw.runs.active, "busy run end")
        busy_events = agent_events(frames, "long-busy")
        assert [e["seq"] for e in busy_events] == list(range(1, 8))
        assert [e["data"]["text"] for e in busy_events if e["stream"] == "assistant"] == [
            "a",
            "ab",
            "abc",
            "abcd",
            "abcde",
        ]
        assert busy_events[-1]["data"]["phase"] == "end"
        assert "long-quiet" in gw.runs.active
        assert (await c.abort("long-quiet"))["aborted"] is True
        await settle(gw)
        await wait_until(
            lambda: agent_events(frames, "long-quiet")[-1]["data"]["phase"] == "end", "quiet run end"
        )
        quiet_events = agent_events(frames, "long-quiet")
        assert quiet_events[0]["data"]["phase"] == "start"
        assert quiet_events[-1]["data"] == {**quiet_events[-1]["data"], "phase": "end", "aborted": True}
        # Contiguous from 1 across the silence: no restart after the idle TTL.
        assert [e["seq"] for e in quiet_events] == [1, 2]
        quiet_chat = chat_events(frames, "long-quiet")
        assert [(e["state"], e["seq"]) for e in quiet_chat] == [("aborted", 1)]
        busy_chat = chat_events(frames, "long-busy")
        assert [e["seq"] for e in busy_chat] == list(range(1, 7))
        sizes = gw.registry.sizes()
        assert sizes["run_contexts"] == 0
        assert sizes["run_watchers"] == 0


async def test_subscription_cap_counts_distinct_keys(gateway: RunningGateway, client: Client) -> None:
    keys = [f"agent:main:s{i}" for i in range(1000)]
    await client.subscribe(keys)
    # The same keys again: still 1000 distinct subscriptions, so not refused.
    await client.subscribe(keys[:500])
    with pytest.raises(ClientError) as info:
        await client.subscribe(["agent:main:one-too-many"])
    assert info.value.code == "FORBIDDEN"
    assert info.value.details == {"maxSubscriptions": 1000}
    assert gateway.gateway.registry.sizes()["session_subscriptions"] == 1000
