"""The session tools (`sessions_list`, `sessions_history`, `sessions_send`, `sessions_spawn`)
go through the RPCs' own code paths and limits."""

from __future__ import annotations

import json
from typing import Any

from clawgate.client import Client
from conftest import GatewayFactory, settle

ALL = ["sessions_list", "sessions_history", "sessions_send", "sessions_spawn"]


def tool_results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e["payload"]["data"]
        for e in events
        if e.get("payload", {}).get("stream") == "tool" and e["payload"]["data"]["phase"] == "result"
    ]


async def run_events(c: Client, message: str, **params: Any) -> list[dict[str, Any]]:
    return [frame async for frame in c.stream_agent(message, **params)]


async def test_list_and_history_match_the_rpcs(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(agents={"main": {"tools": ALL}})
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        await c.run_agent("[[reply:the answer is 42]] question", sessionKey="agent:main:kb")
        rpc_list = await c.call("sessions.list", {"prefix": "agent:main:kb"})
        rpc_history = await c.call("chat.history", {"sessionKey": "agent:main:kb"})
        events = await run_events(
            c,
            '[[tool:sessions_list {"prefix": "agent:main:kb"}]] '
            '[[tool:sessions_history {"sessionKey": "agent:main:kb"}]]',
        )
    listed, history = (
        r["result"] for r in sorted(tool_results(events), key=lambda r: r["name"], reverse=True)
    )
    assert listed == rpc_list
    assert history == rpc_history
    assert [m["content"] for m in history["messages"]] == [
        "[[reply:the answer is 42]] question",
        "the answer is 42",
    ]


async def test_tool_arguments_are_validated_like_rpc_params(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(agents={"main": {"tools": ALL}})
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        events = await run_events(
            c,
            '[[tool:sessions_history {"sessionKey": "not a key"}]] [[tool:sessions_list {"limit": 0}]]',
        )
    results = tool_results(events)
    assert len(results) == 2
    for r in results:
        assert r["isError"] and r["result"]["code"] == "INVALID_REQUEST"
        assert "invalid sessions_" in r["result"]["error"]


async def test_send_starts_a_run_in_another_session_and_waits_for_its_reply(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(agents={"main": {"tools": ALL}, "alpha": {"tools": []}})
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        args = {
            "sessionKey": "agent:alpha:desk",
            "message": "[[reply:pong from alpha]] ping",
            "timeoutSeconds": 30,
        }
        events = await run_events(c, f"[[tool:sessions_send {json.dumps(args)}]]")
        result = tool_results(events)[0]["result"]
        assert result["status"] == "ok" and result["reply"] == "pong from alpha"
        history = await c.call("chat.history", {"sessionKey": "agent:alpha:desk"})
        assert [m["content"] for m in history["messages"]][-1] == "pong from alpha"
        # Not waiting: the run id comes back at once.
        args = {"sessionKey": "agent:alpha:desk", "message": "[[reply:later]] again"}
        events = await run_events(
            c, f"[[tool:sessions_send {json.dumps(args)}]]", sessionKey="agent:main:two"
        )
        assert tool_results(events)[0]["result"]["status"] == "started"
        # An unknown agent, and the calling session itself, are refused.
        for bad, why in (
            ({"sessionKey": "agent:ghost:x", "message": "hi"}, "unknown agent"),
            ({"sessionKey": "agent:main:self", "message": "hi"}, "calling session"),
        ):
            events = await run_events(
                c, f"[[tool:sessions_send {json.dumps(bad)}]]", sessionKey="agent:main:self"
            )
            refused = tool_results(events)[0]
            assert refused["isError"] and why in refused["result"]["error"]
    await settle(gw.gateway)


async def test_spawn_tool_has_the_profile_limits_of_the_rpc(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        agents={"main": {}, "solo": {"tools": ["sessions_spawn"], "max_children_per_agent": 1}}
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        events = await run_events(
            c,
            '[[tool:sessions_spawn {"task": "[[stall]] one"}]] [[tool:sessions_spawn {"task": "[[stall]] two"}]]',
            sessionKey="agent:solo:main",
        )
    results = tool_results(events)
    assert sorted(r["isError"] for r in results) == [False, True]
    refused = next(r for r in results if r["isError"])
    assert refused["result"]["code"] == "FORBIDDEN" and "maxChildrenPerAgent 1" in refused["result"]["error"]
    assert len(gw.gateway.subagents.active) == 1
