"""The `openai` provider inside a real gateway, against the local OpenAI-compatible stub
(tests/openai_stub.py): streamed text, a sessions_spawn tool call, a 500, a stall."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from clawgate.client import Client
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle
from helpers import wait_until
from openai_stub import StubBehaviour, run_stub


class Setup:
    def __init__(self, rg: RunningGateway, client: Client, behaviour: StubBehaviour) -> None:
        self.rg = rg
        self.client = client
        self.behaviour = behaviour
        self.frames: list[dict[str, Any]] = []
        client.on_event = self.frames.append

    def agent_events(self, run_id: str) -> list[dict[str, Any]]:
        return [
            f["payload"] for f in self.frames if f.get("event") == "agent" and f["payload"]["runId"] == run_id
        ]


@pytest.fixture
async def openai_gw(start_gateway: GatewayFactory) -> AsyncIterator[Setup]:
    behaviour = StubBehaviour()
    async with run_stub(behaviour) as base_url:
        rg = await start_gateway(
            provider="openai",
            openai_base_url=base_url,
            openai_model="stub-model",
            shutdown_grace_s=0,
            provider_max_retries=1,
        )
        async with Client(rg.url, max_reconnect_attempts=0) as client:
            yield Setup(rg, client, behaviour)
        # Stop the gateway (and its HTTP client) before the stub goes away.
        await rg.stop()


async def test_text_streams_as_assistant_events(openai_gw: Setup) -> None:
    c = openai_gw.client
    final = await c.run_agent("hello there", session_key="agent:main:oa", idempotency_key="oa-1")
    assert final["status"] == "ok"
    assert final["result"]["payloads"][0]["text"] == "stub reply: hello there"
    await wait_until(lambda: len(openai_gw.agent_events("oa-1")) >= 3, "events")
    events = openai_gw.agent_events("oa-1")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["data"]["phase"] == "start" and events[-1]["data"]["phase"] == "end"
    deltas = [e["data"] for e in events if e["stream"] == "assistant"]
    assert len(deltas) == 3  # the stub streams the reply in three content chunks
    assert "".join(d["delta"] for d in deltas) == "stub reply: hello there"
    assert [d["text"] for d in deltas] == [
        "".join(d["delta"] for d in deltas[: i + 1]) for i in range(len(deltas))
    ]
    request = openai_gw.behaviour.requests[0]
    assert request["model"] == "stub-model" and request["stream"] is True
    assert request["messages"] == [{"role": "user", "content": "hello there"}]
    # The gateway always offers its sessions_spawn tool.
    assert [t["function"]["name"] for t in request["tools"]] == ["sessions_spawn"]

    # The session's transcript is sent with the next turn.
    await c.run_agent("again", session_key="agent:main:oa", idempotency_key="oa-2")
    assert openai_gw.behaviour.requests[1]["messages"] == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "stub reply: hello there"},
        {"role": "user", "content": "again"},
    ]


async def test_tool_call_spawns_a_subagent_then_replies(openai_gw: Setup) -> None:
    c = openai_gw.client
    key = "agent:main:parent"
    final = await c.run_agent("please call-tool", session_key=key, idempotency_key="oa-tool")
    assert final["status"] == "ok", final
    text = final["result"]["payloads"][0]["text"]
    assert text.startswith("tool said: ")
    tool_result = json.loads(text.removeprefix("tool said: "))
    assert tool_result["status"] == "accepted"
    child_key = tool_result["childSessionKey"]
    assert child_key.startswith("agent:main:subagent:")

    events = openai_gw.agent_events("oa-tool")
    tools = [e["data"] for e in events if e["stream"] == "tool"]
    assert [(t["phase"], t["name"], t["toolCallId"]) for t in tools] == [
        ("start", "sessions_spawn", "call_stub_1"),
        ("result", "sessions_spawn", "call_stub_1"),
    ]
    assert tools[0]["args"] == {"task": "child work", "mode": "session"}
    assert tools[1]["result"] == tool_result

    listed = await c.call("subagents.list", {"sessionKey": key})
    assert [r["runId"] for r in listed["runs"]] == [tool_result["runId"]]
    child = listed["runs"][0]
    assert child["childSessionKey"] == child_key
    assert child["requesterSessionKey"] == key
    assert child["mode"] == "session"

    # The child ran through the same provider in its own session.
    done = await c.wait(tool_result["runId"], timeout_ms=10_000)
    assert done["status"] == "ok"
    await settle(openai_gw.rg.gateway)
    child_history = await c.call("chat.history", {"sessionKey": child_key})
    assert [(m["role"], m["content"]) for m in child_history["messages"]] == [
        ("user", "child work"),
        ("assistant", "stub reply: child work"),
    ]
    # The parent's second request carried the tool call and its result (the child's first
    # request may come before or after it: they run concurrently).
    second = next(r["messages"] for r in openai_gw.behaviour.requests if r["messages"][-1]["role"] == "tool")
    assert second[-2]["role"] == "assistant"
    assert second[-2]["tool_calls"][0]["id"] == "call_stub_1"
    assert second[-1] == {"role": "tool", "content": json.dumps(tool_result), "tool_call_id": "call_stub_1"}


async def test_http_500_ends_the_run_as_error(openai_gw: Setup) -> None:
    c = openai_gw.client
    final = await c.run_agent("please fail-500", session_key="agent:main:oa-err", idempotency_key="oa-500")
    assert final["status"] == "error"
    assert final["error"].startswith("provider returned 500")
    assert "stub failure" in final["error"]
    # A 5xx is retryable: one retry (provider_max_retries=1), then the run ends.
    assert len(openai_gw.behaviour.requests) == 2
    await wait_until(lambda: len(openai_gw.agent_events("oa-500")) == 4, "4 lifecycle events")
    lifecycle = [e["data"] for e in openai_gw.agent_events("oa-500")]
    assert [(d["phase"], d.get("willRetry", False)) for d in lifecycle] == [
        ("start", False),
        ("error", True),
        ("start", False),
        ("error", False),
    ]
    assert lifecycle[-1]["error"] == final["error"]
    waited = await c.wait("oa-500")
    assert waited["status"] == "error" and waited["error"] == final["error"]


async def test_stalled_http_stream_ends_by_timeout(openai_gw: Setup, clock: FakeClock) -> None:
    c = openai_gw.client
    gw = openai_gw.rg.gateway
    task = asyncio.create_task(
        c.run_agent("please stall", session_key="agent:main:oa-stall", idempotency_key="oa-stall", timeout=5)
    )
    await wait_until(lambda: len(openai_gw.behaviour.requests) == 1, "request reached the stub")
    await clock.advance_async(5)
    final = await asyncio.wait_for(task, 10)
    assert final["status"] == "timeout"
    await settle(gw)
    assert gw.registry.sizes()["runs_active"] == 0
    # The gateway still serves the provider after the cancelled stream.
    ok = await c.run_agent("fine", session_key="agent:main:oa-stall", idempotency_key="oa-after")
    assert ok["status"] == "ok"


async def test_usage_totals_match_the_provider_reports_exactly(openai_gw: Setup) -> None:
    c = openai_gw.client
    # Two provider calls: the tool call turn (an unknown tool: no subagent), then the reply.
    final = await c.run_agent(
        "call-tool:nope please", session_key="agent:main:usage", idempotency_key="use-1"
    )
    await settle(openai_gw.rg.gateway)
    reported = openai_gw.behaviour.usages
    assert len(reported) == 2
    prompt = sum(p for p, _ in reported)
    completion = sum(o for _, o in reported)
    assert final["result"]["meta"]["usage"] == {
        "input": prompt,
        "output": completion,
        "total": prompt + completion,
        "model": "stub-model",
    }
    assert openai_gw.behaviour.requests[0]["stream_options"] == {"include_usage": True}
