"""The session and catalog methods OpenClaw's terminal UI calls, and the session events.

`sessions.subscribe`, `sessions.describe`, `sessions.create`, `sessions.resolve`,
`sessions.list` with `agentId`, `agents.list`, `models.list`, `commands.list`,
`config.get`, the empty answers for features clawgate does not have (questions,
plugin approvals, artifacts), and the `sessions.changed` / `session.message` events,
over a real WebSocket to a real gateway (scripted provider, FakeClock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from clawgate.client import Client, ClientError
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle, unique_prefix

TUI_METHODS = {
    "sessions.subscribe",
    "sessions.describe",
    "sessions.list",
    "sessions.create",
    "sessions.resolve",
    "sessions.patch",
    "sessions.reset",
    "chat.send",
    "chat.history",
    "chat.abort",
    "agents.list",
    "models.list",
    "commands.list",
    "config.get",
    "question.list",
    "question.get",
    "question.resolve",
    "plugin.approval.list",
    "plugin.approval.resolve",
    "artifacts.download",
}


class Recorder:
    """Collects the event frames a client receives."""

    def __init__(self, client: Client) -> None:
        self.frames: list[dict[str, Any]] = []
        client.on_event = self.frames.append

    def payloads(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            f["payload"]
            for f in self.frames
            if f.get("event") == event and all(f["payload"].get(k) == v for k, v in match.items())
        ]

    async def until(self, pred: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not pred():
            assert loop.time() < deadline, f"timed out waiting for {what}: {self.frames}"
            await asyncio.sleep(0.002)


async def test_hello_advertises_exactly_the_table_and_the_session_events(
    gateway: RunningGateway, client: Client
) -> None:
    features = client.hello["features"]
    assert features["methods"] == sorted(gateway.gateway.methods)
    assert set(features["methods"]) >= TUI_METHODS
    assert {"sessions.changed", "session.message"} <= set(features["events"])


async def test_subscriber_sees_session_events_of_runs_it_did_not_start(
    gateway: RunningGateway, client: Client
) -> None:
    key = "agent:main:watched"
    async with Client(gateway.url, max_reconnect_attempts=0) as tui:
        events = Recorder(tui)
        assert await tui.call("sessions.subscribe", {}) == {"subscribed": True}
        final = await client.run_agent("[[reply:pong]]", session_key=key, idempotency_key="w-1")
        assert final["status"] == "ok"
        await events.until(lambda: len(events.payloads("sessions.changed", phase="end")) == 1, "run end")

        changed = events.payloads("sessions.changed", sessionKey=key)
        assert [(c.get("reason"), c.get("phase")) for c in changed] == [
            (None, "start"),
            ("new", None),
            (None, "end"),
        ]
        new = changed[1]
        assert new["agentId"] == "main"
        assert new["session"]["key"] == key and new["session"]["sessionId"] == new["sessionId"]
        messages = events.payloads("session.message", sessionKey=key)
        assert [(m["message"]["role"], m["message"]["content"]) for m in messages] == [
            ("user", [{"type": "text", "text": "[[reply:pong]]"}]),
            ("assistant", [{"type": "text", "text": "pong"}]),
        ]
        assert [m["messageId"] for m in messages] == ["w-1:user", "w-1:assistant"]
        assert {m["runId"] for m in messages} == {"w-1"}
        assert {m["sessionId"] for m in messages} == {new["sessionId"]}
        # And the run's stream, as OpenClaw broadcasts it: a TUI shows runs other clients start.
        assert [c["state"] for c in events.payloads("chat", runId="w-1")] == ["delta", "final"]


async def test_the_run_end_reaches_subscribers_after_the_final_chat_event(
    gateway: RunningGateway, client: Client
) -> None:
    # A client that reloads the history on the end must find the final answer in it.
    events = Recorder(client)
    await client.call("sessions.subscribe", {})
    await client.run_agent("[[reply:done]]", session_key="agent:main:order", idempotency_key="o-1")
    await events.until(lambda: bool(events.payloads("sessions.changed", phase="end")), "run end")
    names = [
        (f["event"], f["payload"].get("state") or f["payload"].get("phase"))
        for f in events.frames
        if f.get("event") in ("chat", "sessions.changed")
    ]
    assert names.index(("chat", "final")) < names.index(("sessions.changed", "end"))


async def test_session_subscriptions_are_bounded_counted_and_swept_with_the_connection(
    gateway: RunningGateway,
) -> None:
    gw = gateway.gateway
    entry = {r.name: r for r in gw.registry.describe()}["all_subscribers"]
    assert entry.max_size == gw.settings.max_connections and entry.ttl_s is None
    tui = Client(gateway.url, max_reconnect_attempts=0)
    await tui.connect()
    await tui.call("sessions.subscribe", {})
    await tui.call("sessions.subscribe", {})  # again: still one subscription
    status = await tui.status()
    assert status["state"]["all_subscribers"] == 1
    await tui.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while gw.connections:
        assert loop.time() < deadline
        await asyncio.sleep(0.002)
    assert gw.registry.sizes()["all_subscribers"] == 0
    assert gw.bus.all_subs == set()


async def test_describe_create_and_resolve(gateway: RunningGateway, client: Client, clock: FakeClock) -> None:
    assert await client.call("sessions.describe", {"key": "agent:main:nothing"}) == {"session": None}

    events = Recorder(client)
    await client.call("sessions.subscribe", {})
    created = await client.call("sessions.create", {"key": "tui-1", "agentId": "main", "label": "work"})
    key = "agent:main:tui-1"
    assert created["ok"] is True and created["key"] == key
    entry = created["entry"]
    assert entry["key"] == key and entry["sessionId"] == created["sessionId"]
    assert entry["label"] == "work" and entry["agentId"] == "main"
    assert (entry["modelProvider"], entry["model"]) == ("scripted", "scripted")
    await events.until(lambda: bool(events.payloads("sessions.changed", reason="new")), "new")
    assert events.payloads("sessions.changed", reason="new")[0]["sessionId"] == created["sessionId"]

    # The short and the full key name the same session; creating it again adopts it.
    described = await client.call("sessions.describe", {"key": "tui-1"})
    assert described == {"session": entry}
    clock.advance(5)
    again = await client.call("sessions.create", {"key": key})
    assert again["sessionId"] == created["sessionId"]
    assert len(events.payloads("sessions.changed", reason="new")) == 1

    found = {"ok": True, "key": key, "agentId": "main"}
    assert await client.call("sessions.resolve", {"key": key}) == found
    assert await client.call("sessions.resolve", {"label": "work"}) == found
    assert await client.call("sessions.resolve", {"sessionId": created["sessionId"]}) == found
    assert await client.call("sessions.resolve", {"key": "agent:main:nope"}) == {"ok": False}
    assert await client.call("sessions.resolve", {"label": "nope"}) == {"ok": False}

    # A key without an agent gets one; an id of its own when none is given.
    other = await client.call("sessions.create", {"agentId": "beta", "label": "work"})
    assert other["key"].startswith("agent:beta:")
    # Two sessions with that label: not resolved, both named.
    assert await client.call("sessions.resolve", {"label": "work"}) == {
        "ok": False,
        "candidates": [{"key": other["key"], "agentId": "beta"}, {"key": key, "agentId": "main"}],
    }
    with pytest.raises(ClientError) as info:
        await client.call("sessions.create", {"key": "bad key!"})
    assert info.value.code == "INVALID_REQUEST"


async def test_create_with_a_model_and_patch_reset_delete_events(
    gateway: RunningGateway, client: Client
) -> None:
    events = Recorder(client)
    await client.call("sessions.subscribe", {})
    key = "agent:main:modelled"
    created = await client.call("sessions.create", {"key": key, "model": "gpt-x"})
    assert created["entry"]["model"] == "gpt-x"
    await client.run_agent("[[reply:a]]", session_key=key, idempotency_key="m-1")
    await client.call("sessions.patch", {"key": key, "label": "renamed"})
    await client.call("sessions.reset", {"key": key})
    await client.call("sessions.delete", {"key": key})
    await events.until(lambda: bool(events.payloads("sessions.changed", reason="delete")), "delete")
    reasons = [c["reason"] for c in events.payloads("sessions.changed", sessionKey=key) if "reason" in c]
    assert reasons == ["new", "patch", "patch", "reset", "delete"]
    patched = events.payloads("sessions.changed", reason="patch")[-1]
    assert patched["session"]["label"] == "renamed"
    reset = events.payloads("sessions.changed", reason="reset")[0]
    assert reset["sessionId"] != created["sessionId"]
    assert "session" not in events.payloads("sessions.changed", reason="delete")[0]


async def test_sessions_list_by_agent_with_defaults(gateway: RunningGateway, client: Client) -> None:
    for key, idem in (("agent:main:a", "l-1"), ("agent:beta:b", "l-2")):
        await client.run_agent("[[reply:x]]", session_key=key, idempotency_key=idem)
    main = await client.call("sessions.list", {"agentId": "main", "limit": 10})
    assert [s["key"] for s in main["sessions"]] == ["agent:main:a"]
    assert main["defaults"] == {"modelProvider": "scripted", "model": "scripted", "contextTokens": None}
    beta = await client.call("sessions.list", {"agentId": "beta", "prefix": "agent:beta:b"})
    assert [s["key"] for s in beta["sessions"]] == ["agent:beta:b"]
    assert (await client.call("sessions.list", {"agentId": "beta", "prefix": "agent:main:"}))[
        "sessions"
    ] == []


async def test_history_messages_carry_the_identity_session_events_use(
    gateway: RunningGateway, client: Client
) -> None:
    key = "agent:main:ident"
    await client.run_agent("[[reply:hi]]", session_key=key, idempotency_key="i-1")
    await settle(gateway.gateway)
    history = await client.call("chat.history", {"sessionKey": key})
    described = await client.call("sessions.describe", {"key": key})
    assert history["sessionId"] == described["session"]["sessionId"]
    assert [m["__openclaw"] for m in history["messages"]] == [
        {"id": "i-1:user", "runId": "i-1"},
        {"id": "i-1:assistant", "runId": "i-1"},
    ]
    assert [m["content"] for m in history["messages"]] == ["[[reply:hi]]", "hi"]


async def test_catalogs(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(
        token="tok-secret", provider="openai", openai_model="m-1", openai_api_key="sk-secret"
    )
    async with Client(rg.url, token="tok-secret", max_reconnect_attempts=0) as c:
        agents = await c.call("agents.list", {})
        listed = agents.pop("agents")
        assert agents == {"defaultId": "main", "mainKey": "main", "scope": "per-sender"}
        # The configured agent profiles (the test settings configure a few), `main` first.
        assert listed[0] == {"id": "main"}
        assert {a["id"] for a in listed} == {"main", *rg.gateway.settings.agents}
        assert await c.call("models.list", {"agentId": "main"}) == {
            "models": [{"id": "m-1", "name": "m-1", "provider": "openai"}]
        }
        commands = (await c.call("commands.list", {"agentId": "main", "scope": "text"}))["commands"]
        assert {cmd["name"] for cmd in commands} >= {"new", "reset", "abort", "model"}
        assert all(cmd["source"] == "native" and cmd["scope"] == "text" for cmd in commands)
        config = await c.call("config.get", {})
        assert config["valid"] is True
        assert config["config"]["token"] == "***"
        assert config["config"]["openai_api_key"] == "***"
        assert "tok-secret" not in str(config) and "sk-secret" not in str(config)


async def test_config_get_hides_credentials_in_the_store_url() -> None:
    from clawgate.methods.catalog import redacted_config
    from clawgate.settings import parse_settings

    view = redacted_config(parse_settings(store="redis://user:pa55@10.0.0.1:6380/0"))
    assert view["store"] == "redis://***@10.0.0.1:6380/0"
    assert "pa55" not in str(view)


async def test_absent_features_answer_empty(client: Client) -> None:
    assert await client.call("question.list", {}) == {"questions": []}
    # A bare array, as OpenClaw answers it (the client wraps non-object payloads).
    assert await client.call("plugin.approval.list", {}) == {"value": []}
    for method, params in (
        ("question.get", {"id": "q1"}),
        ("question.resolve", {"id": "q1", "answers": {"answers": {}}}),
        ("plugin.approval.resolve", {"id": "p1", "decision": "allow"}),
        ("artifacts.download", {"sessionKey": "agent:main:main", "artifactId": "a1"}),
    ):
        with pytest.raises(ClientError) as info:
            await client.call(method, params)
        assert info.value.code == "NOT_FOUND", method


def test_list_prefix_combines_prefix_and_agent() -> None:
    from clawgate.methods.sessions import NOTHING, list_prefix

    assert list_prefix(None, None) is None
    assert list_prefix("agent:a", None) == "agent:a"
    assert list_prefix(None, "main") == "agent:main:"
    assert list_prefix("agent:", "main") == "agent:main:"
    assert list_prefix("agent:main:x", "main") == "agent:main:x"
    assert list_prefix("agent:beta:", "main") == NOTHING


async def test_patch_model_null_returns_to_the_default_model(client: Client) -> None:
    # `/model default` in OpenClaw's TUI sends `model: null`.
    key = "agent:main:model-default"
    await client.call("sessions.create", {"key": key})
    await client.call("sessions.patch", {"key": key, "model": "picked"})
    assert (await client.call("sessions.describe", {"key": key}))["session"]["model"] == "picked"
    await client.call("sessions.patch", {"key": key, "label": "kept"})  # no `model`: unchanged
    assert (await client.call("sessions.describe", {"key": key}))["session"]["model"] == "picked"
    await client.call("sessions.patch", {"key": key, "model": None})
    session = (await client.call("sessions.describe", {"key": key}))["session"]
    assert (session["model"], session["label"]) == ("scripted", "kept")


async def test_a_subscriber_of_one_session_gets_its_session_events_only(
    gateway: RunningGateway, client: Client
) -> None:
    async with Client(gateway.url, max_reconnect_attempts=0) as watcher:
        events = Recorder(watcher)
        await watcher.subscribe(["agent:main:mine"])
        await client.run_agent("[[reply:other]]", session_key="agent:main:other", idempotency_key="s-1")
        await client.run_agent("[[reply:mine]]", session_key="agent:main:mine", idempotency_key="s-2")
        await events.until(lambda: bool(events.payloads("sessions.changed", phase="end")), "run end")
        keys = {
            f["payload"]["sessionKey"]
            for f in events.frames
            if f["event"] in ("sessions.changed", "session.message")
        }
        assert keys == {"agent:main:mine"}
        assert len(events.payloads("session.message")) == 2


async def _messages_not_written_by_append_reach_subscribers(url: str) -> None:
    """A TUI showing a session sees every message appended to it, also those written outside
    `SessionService.append`: a subagent's announce (the pipeline's conditional append) and, on
    the shared Redis queue, a run's reply (written by the run's fenced end script)."""
    key = "agent:main:requester"
    async with (
        Client(url, max_reconnect_attempts=0) as client,
        Client(url, max_reconnect_attempts=0) as tui,
    ):
        events = Recorder(tui)
        assert await tui.call("sessions.subscribe", {}) == {"subscribed": True}
        final = await client.run_agent(
            '[[tool:sessions_spawn {"task":"[[reply:child says hi]]"}]]',
            session_key=key,
            idempotency_key="rq-1",
        )
        assert final["status"] == "ok"

        def of_role(role: str) -> list[dict[str, Any]]:
            return [
                m for m in events.payloads("session.message", sessionKey=key) if m["message"]["role"] == role
            ]

        await events.until(lambda: bool(of_role("system")), "the announce's session.message")
        await events.until(lambda: bool(of_role("assistant")), "the reply's session.message")
        history = (await client.call("chat.history", {"sessionKey": key}))["messages"]
        assert [m["role"] for m in history] == ["user", "assistant", "system"]
        session_id = of_role("user")[0]["sessionId"]
        for role, stored in zip(("user", "assistant", "system"), history, strict=True):
            [message] = of_role(role)
            assert message["messageId"] == stored["__openclaw"]["id"]
            assert message["runId"] == stored["__openclaw"]["runId"]
            assert message["message"]["content"] == [{"type": "text", "text": stored["content"]}]
            assert message["sessionId"] == session_id
        assert "child says hi" in history[2]["content"]
        assert history[1]["content"] == final["result"]["payloads"][0]["text"]


async def test_messages_not_written_by_append_reach_subscribers_sqlite(gateway: RunningGateway) -> None:
    await _messages_not_written_by_append_reach_subscribers(gateway.url)


@pytest.mark.redis
async def test_messages_not_written_by_append_reach_subscribers_redis(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    rg = await start_gateway(store=redis_url, redis_prefix=unique_prefix())
    await _messages_not_written_by_append_reach_subscribers(rg.url)
