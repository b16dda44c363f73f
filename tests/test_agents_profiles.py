"""Agent profiles: `[agents.<id>]` picks model, prompt, tools and limits; unknown ids are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from clawgate.client import Client, ClientError
from clawgate.ids import RunId, SessionKey
from clawgate.runs.service import SubmitRequest
from clawgate.settings import load_settings, parse_settings
from conftest import GatewayFactory, settle
from openai_stub import StubBehaviour, run_stub

TOKEN = "t0ken-for-agent-profile-tests-0123"


def tool_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["payload"]["data"] for e in events if e.get("payload", {}).get("stream") == "tool"]


async def run_with_events(
    c: Client, message: str, **params: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    async for frame in c.stream_agent(message, **params):
        events.append(frame)
    run_id = events[0]["payload"]["runId"]
    final = await c.wait(run_id, timeout_ms=10_000)
    return final, events


async def test_unknown_agent_is_refused_naming_the_field(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(token=TOKEN)
    async with Client(gw.url, token=TOKEN, max_reconnect_attempts=0) as c:
        cases = [
            ("agent", {"message": "hi", "idempotencyKey": "u1", "agentId": "ghost"}, "agentId"),
            (
                "agent",
                {"message": "hi", "idempotencyKey": "u2", "sessionKey": "agent:ghost:main"},
                "sessionKey",
            ),
            (
                "chat.send",
                {"message": "hi", "idempotencyKey": "u3", "sessionKey": "agent:ghost:x"},
                "sessionKey",
            ),
            ("sessions.spawn", {"sessionKey": "agent:main:main", "task": "t", "agentId": "ghost"}, "agentId"),
        ]
        for method, params, field in cases:
            with pytest.raises(ClientError) as err:
                await c.call(method, params)
            assert err.value.code == "INVALID_REQUEST", method
            assert err.value.details["field"] == field, method
            assert "ghost" in err.value.message
        # A configured agent is accepted, by id and by session key.
        ok = await c.run_agent("[[reply:fine]]", agentId="alpha")
        assert ok["status"] == "ok"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=gw.http_url, headers=headers, timeout=30) as http:
        r = await http.post("/v1/runs", json={"message": "x", "agentId": "ghost"})
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "agentId"
        r = await http.post("/v1/runs", json={"message": "x", "sessionKey": "agent:ghost:main"})
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "sessionKey"
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "openclaw:ghost", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 400 and "ghost" in r.json()["error"]["message"]
        models = (await http.get("/v1/models")).json()["data"]
        assert {"openclaw:alpha", "openclaw:main"} <= {m["id"] for m in models}
    assert gw.gateway.runs.active.__len__() == 0


async def test_agents_list_models_list_and_tools_catalog(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        fallback_models=["global-fallback"],
        agents={
            "main": {},
            "research": {
                "name": "Researcher",
                "model": "big-model",
                "fallback_models": ["small-model"],
                "tools": ["sessions_list", "sessions_history"],
            },
        },
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        listed = await c.call("agents.list")
        assert listed["defaultId"] == "main" and listed["mainKey"] == "main"
        assert listed["agents"] == [{"id": "main"}, {"id": "research", "name": "Researcher"}]
        models = {m["id"]: m for m in (await c.call("models.list"))["models"]}
        assert set(models) == {"scripted", "global-fallback", "big-model", "small-model"}
        assert models["big-model"] == {"id": "big-model", "name": "big-model", "provider": "scripted"}
        catalog = await c.call("tools.catalog", {"agentId": "research"})
        assert [t["name"] for t in catalog["tools"]] == ["sessions_list", "sessions_history"]
        assert {t["scope"] for t in catalog["tools"]} == {"operator.read"}
        main = await c.call("tools.catalog", {})
        assert [t["name"] for t in main["tools"]] == ["sessions_spawn"]
        with pytest.raises(ClientError) as err:
            await c.call("tools.catalog", {"agentId": "ghost"})
        assert err.value.details["field"] == "agentId"


async def test_profile_model_prompt_file_and_tools_reach_the_provider(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A profile on the OpenAI provider (the gateway's own is scripted): the stub sees its model,
    its system prompt read from a file, and only the tools its allowlist names."""
    prompt = tmp_path / "prompt.md"
    prompt.write_text("You triage tickets.", encoding="utf-8")
    behaviour = StubBehaviour()
    async with run_stub(behaviour) as base_url:
        gw = await start_gateway(
            openai_base_url=base_url,
            agents={
                "main": {},
                "triage": {
                    "provider": "openai",
                    "model": "triage-model",
                    "system_prompt_file": str(prompt),
                    "tools": ["sessions_list"],
                },
            },
        )
        async with Client(gw.url, max_reconnect_attempts=0) as c:
            final = await c.run_agent(
                "call-tool:sessions_list", agentId="triage", extraSystemPrompt="Be brief."
            )
            assert final["status"] == "ok", final
            # The scripted main agent is untouched by the profile.
            assert (await c.run_agent("[[reply:scripted]]"))["result"]["payloads"][0]["text"] == "scripted"
    first = behaviour.requests[0]
    assert first["model"] == "triage-model"
    assert first["messages"][0] == {"role": "system", "content": "You triage tickets.\n\nBe brief."}
    assert [t["function"]["name"] for t in first["tools"]] == ["sessions_list"]
    # The tool ran (same code path as sessions.list) and its result went back to the model.
    tool_msg = next(m for m in behaviour.requests[1]["messages"] if m["role"] == "tool")
    assert "sessions" in json.loads(tool_msg["content"])


async def test_tools_are_denied_unless_allowed(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(agents={"main": {}, "plain": {"tools": []}})
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final, events = await run_with_events(
            c, '[[tool:sessions_spawn {"task": "x"}]]', sessionKey="agent:plain:main"
        )
        assert final["status"] == "ok"
        results = [e for e in tool_events(events) if e["phase"] == "result"]
        assert len(results) == 1 and results[0]["isError"] is True
        assert "not allowed for agent 'plain'" in results[0]["result"]["error"]
        assert "durationMs" in results[0]
    await settle(gw.gateway)
    assert len(gw.gateway.subagents.active) == 0  # nothing was spawned


async def test_turn_limit_ends_the_run_with_a_clear_error(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(agents={"main": {}, "short": {"tools": ["sessions_list"], "max_turns": 1}})
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("[[tool:sessions_list {}]]", agentId="short")
        assert final["status"] == "error"
        assert "turn limit (max_turns 1)" in final["error"]
        # Two turns are enough for one tool round and the reply.
        gw2_ok = await c.run_agent("[[tool:sessions_list {}]]", agentId="main", sessionKey="agent:main:other")
        assert gw2_ok["status"] == "ok"


async def test_max_tool_calls_refuses_the_calls_beyond_it(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(agents={"main": {}, "capped": {"tools": ["sessions_list"], "max_tool_calls": 2}})
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final, events = await run_with_events(
            c,
            "[[tool:sessions_list {}]] [[tool:sessions_list {}]] [[tool:sessions_list {}]]",
            agentId="capped",
        )
    assert final["status"] == "ok"
    # Calls of one turn run concurrently, so results arrive in any order: match them by id.
    order = [e["toolCallId"] for e in tool_events(events) if e["phase"] == "start"]
    by_id = {e["toolCallId"]: e for e in tool_events(events) if e["phase"] == "result"}
    results = [by_id[call_id] for call_id in order]
    assert [r["isError"] for r in results] == [False, False, True]
    assert "max_tool_calls 2" in results[2]["result"]["error"]
    assert gw.gateway.runs.active.__len__() == 0


async def test_per_agent_subagent_limits(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        max_children_per_agent=5,
        agents={"main": {}, "solo": {"max_children_per_agent": 1}},
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        await c.spawn("agent:solo:main", "[[stall]] first")
        with pytest.raises(ClientError) as err:
            await c.spawn("agent:solo:main", "second")
        assert err.value.code == "FORBIDDEN"
        assert err.value.details["maxChildrenPerAgent"] == 1
        # main keeps the gateway-wide limit.
        await c.spawn("agent:main:main", "[[stall]] a")
        await c.spawn("agent:main:main", "[[stall]] b")


async def test_profile_fallback_model_uses_the_circuit_breakers(start_gateway: GatewayFactory) -> None:
    """A profile's fallback goes through the provider's breakers: with the primary's circuit
    open, the turn goes to the profile's fallback (not the gateway's)."""
    gw = await start_gateway(
        provider_breaker_failures=1,
        provider_max_retries=0,
        fallback_models=["gateway-fallback"],
        agents={"main": {}, "fb": {"model": "primary", "fallback_models": ["profile-fallback"]}},
    )
    provider = gw.gateway.provider
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        failed = await c.run_agent("[[fail-model:primary]] x", agentId="fb")
        assert failed["status"] == "error"
        ok = await c.run_agent("[[fail-model:primary]] y", agentId="fb", sessionKey="agent:fb:two")
        assert ok["status"] == "ok"
    stats = provider.stats()  # type: ignore[attr-defined]
    assert stats["circuits"]["primary"]["state"] == "open"
    assert "profile-fallback" in stats["circuits"]
    assert stats["fallbacksUsed"] == 1


async def test_a_run_cannot_use_tools_its_starter_could_not(start_gateway: GatewayFactory) -> None:
    """The starter's scopes are recorded on the run: a read-only start may read sessions but
    not send into one (a write tool), although the profile allows both."""
    gw = await start_gateway(agents={"main": {"tools": ["sessions_list", "sessions_send"]}})
    runs = gw.gateway.runs
    msg = '[[tool:sessions_list {}]] [[tool:sessions_send {"sessionKey": "agent:main:x", "message": "hi"}]]'
    await runs.submit(
        SubmitRequest(
            run_id=RunId("read-only-run"),
            session_key=SessionKey("agent:main:main"),
            agent_id="main",
            message=msg,
            scopes=frozenset({"operator.read"}),
        )
    )
    rec = await runs.wait(RunId("read-only-run"), 10)
    assert rec is not None and rec.status == "ok"
    assert rec.result_text is not None
    assert '"sessions": [' in rec.result_text
    assert "needs scope operator.write" in rec.result_text
    await settle(gw.gateway)
    assert await gw.gateway.sessions.get(SessionKey("agent:main:x")) is None  # nothing was sent


def test_profiles_from_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "clawgate.toml"
    cfg.write_text(
        """
[agents.ops]
name = "Ops"
model = "gpt-4o"
fallback_models = ["gpt-4o-mini"]
system_prompt = "You run operations."
tools = ["sessions_list", "time.*"]
max_turns = 4
tool_timeout_s = 5
max_spawn_depth = 2

[mcp_servers.time]
command = "mcp-server-time"
args = ["--local-timezone", "UTC"]
""",
        encoding="utf-8",
    )
    s = load_settings(cfg)
    assert s.agents["ops"].tools == ["sessions_list", "time.*"]
    assert s.mcp_servers["time"].command == "mcp-server-time"
    bad = tmp_path / "bad.toml"
    bad.write_text('[agents.x]\ntools = ["nope.*"]\n', encoding="utf-8")
    from clawgate.agents.profiles import Profiles

    with pytest.raises(ValueError, match="unknown MCP servers"):
        Profiles(load_settings(bad))
    worse = tmp_path / "worse.toml"
    worse.write_text("[agents.x]\nmax_turns = 0\n", encoding="utf-8")
    with pytest.raises(ValueError):
        load_settings(worse)


def test_profiles_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLAWGATE_AGENTS", '{"ops": {"model": "m1", "tools": ["sessions_list"]}}')
    s = load_settings(None, state_dir=str(tmp_path))
    assert s.agents["ops"].model == "m1"


def test_secrets_of_mcp_servers_are_redacted() -> None:
    from clawgate.tools.redact import redact

    s = parse_settings(
        mcp_servers={
            "a": {"command": "x", "env": {"API_KEY": "secret-1"}},
            "b": {"url": "http://127.0.0.1:1/mcp", "headers": {"Authorization": "Bearer secret-2"}},
        }
    )
    dumped = json.dumps(s.redacted())
    assert "secret-1" not in dumped and "secret-2" not in dumped
    logged = redact({"query": "q", "api_key": "secret-3", "nested": {"password": "p"}, "long": "y" * 1000})
    assert logged["api_key"] == "***" and logged["nested"]["password"] == "***"
    assert logged["query"] == "q" and len(logged["long"]) < 300


async def test_cron_job_of_an_unknown_agent_is_refused(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        base = {"name": "j", "schedule": {"kind": "every", "everyMs": 60_000}, "message": "m"}
        for extra, field in (
            ({"agentId": "ghost"}, "agentId"),
            ({"sessionKey": "agent:ghost:c"}, "sessionKey"),
        ):
            with pytest.raises(ClientError) as err:
                await c.call("cron.add", {**base, **extra})
            assert err.value.code == "INVALID_REQUEST" and err.value.details["field"] == field
        assert (await c.call("cron.add", {**base, "agentId": "alpha"}))["ok"] is True
