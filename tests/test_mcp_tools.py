"""MCP tool servers: real servers (mcp-server-time, mcp-server-git, and a server of the tests'
own over stdio and streamable HTTP), called by runs of the scripted and OpenAI-stub models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clawgate.client import Client, ClientError
from clawgate.state.clock import FakeClock
from clawgate.testing import free_port
from conftest import GatewayFactory, settle
from helpers import advance_until
from openai_stub import StubBehaviour, run_stub

HERE = Path(__file__).parent
TEST_SERVER = str(HERE / "mcp_test_server.py")
BIN = Path(sys.executable).parent
TOKEN = "t0ken-for-mcp-tests-0123456789abc"
ADMIN = ["operator.read", "operator.write", "operator.admin"]


def own_stdio(**extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [TEST_SERVER], **extra}


def time_server() -> dict[str, Any]:
    return {"command": str(BIN / "mcp-server-time"), "args": ["--local-timezone", "UTC"]}


def tool_data(events: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    return [
        e["payload"]["data"]
        for e in events
        if e.get("payload", {}).get("stream") == "tool" and e["payload"]["data"]["phase"] == phase
    ]


async def run_events(c: Client, message: str, **params: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    events = [frame async for frame in c.stream_agent(message, **params)]
    final = await c.wait(events[0]["payload"]["runId"], timeout_ms=60_000)
    return final, events


def git(repo: Path, cmd: list[str]) -> str:
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout


async def test_time_server_result_reaches_transcript_and_events(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        mcp_servers={"time": time_server()},
        agents={"main": {"tools": ["time.get_current_time"]}},
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        catalog = await c.call("tools.catalog", {})
        assert [t["name"] for t in catalog["tools"]] == ["time.get_current_time"]  # not convert_time
        final, events = await run_events(c, '[[tool:time.get_current_time {"timezone": "Europe/Paris"}]]')
        assert final["status"] == "ok", final
        start, result = tool_data(events, "start"), tool_data(events, "result")
        assert [s["name"] for s in start] == ["time.get_current_time"]
        assert start[0]["args"] == {"timezone": "Europe/Paris"}
        assert result[0]["toolCallId"] == start[0]["toolCallId"]
        assert result[0]["isError"] is False and isinstance(result[0]["durationMs"], int)
        structured = result[0]["result"]["structuredContent"]
        assert structured["timezone"] == "Europe/Paris" and "datetime" in structured
        history = await c.call("chat.history", {"sessionKey": "agent:main:main"})
        reply = history["messages"][-1]
        assert reply["role"] == "assistant" and "Europe/Paris" in reply["content"]
        assert structured["datetime"] in reply["content"]


async def test_openai_stub_model_calls_the_time_server(start_gateway: GatewayFactory) -> None:
    behaviour = StubBehaviour(tool_arguments={"timezone": "Asia/Tokyo"})
    async with run_stub(behaviour) as base_url:
        gw = await start_gateway(
            provider="openai",
            openai_base_url=base_url,
            mcp_servers={"time": time_server()},
            agents={"main": {"tools": ["time.*"]}},
        )
        async with Client(gw.url, max_reconnect_attempts=0) as c:
            final = await c.run_agent("call-tool:time__get_current_time")
    assert final["status"] == "ok", final
    assert {t["function"]["name"] for t in behaviour.requests[0]["tools"]} == {
        "time__get_current_time",
        "time__convert_time",
    }
    text = final["result"]["payloads"][0]["text"]
    assert text.startswith("tool said: ") and "Asia/Tokyo" in text and "datetime" in text


async def test_git_server_on_a_repository_the_test_creates(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (
        ["git", "init", "-q"],
        [
            "git",
            "-c",
            "user.name=T",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "first commit of the test repo",
        ],
    ):
        git(repo, cmd)
    (repo / "notes.txt").write_text("untracked\n", encoding="utf-8")
    gw = await start_gateway(
        mcp_servers={"git": {"command": str(BIN / "mcp-server-git"), "args": ["--repository", str(repo)]}},
        agents={"main": {"tools": ["git.git_status", "git.git_log"]}},
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        args = json.dumps({"repo_path": str(repo)})
        final, events = await run_events(c, f"[[tool:git.git_log {args}]] [[tool:git.git_status {args}]]")
        assert final["status"] == "ok", final
        results = {r["name"]: r for r in tool_data(events, "result")}
        assert not results["git.git_log"]["isError"], results
        log_text = json.dumps(results["git.git_log"]["result"])
        assert "first commit of the test repo" in log_text
        assert "notes.txt" in json.dumps(results["git.git_status"]["result"])
        # A write tool the allowlist does not name is refused, not called.
        final, events = await run_events(
            c, f"[[tool:git.git_add {json.dumps({'repo_path': str(repo), 'files': ['notes.txt']})}]]"
        )
        refused = tool_data(events, "result")[0]
        assert refused["isError"] and "not allowed" in refused["result"]["error"]
    assert git(repo, ["git", "diff", "--cached", "--name-only"]) == ""


async def test_parallel_calls_run_concurrently_with_results_in_order(start_gateway: GatewayFactory) -> None:
    """Two calls of one turn meet at a barrier in the server: had they run one after the other,
    the first would wait for the second forever (and fail at the server's 30 s limit)."""
    gw = await start_gateway(mcp_servers={"t": own_stdio()}, agents={"main": {"tools": ["t.barrier"]}})
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent(
            '[[tool:t.barrier {"name": "b", "n": 2, "tag": "first"}]] '
            '[[tool:t.barrier {"name": "b", "n": 2, "tag": "second"}]]'
        )
    assert final["status"] == "ok"
    text = final["result"]["payloads"][0]["text"]
    assert text.index("b passed with 2: first") < text.index("b passed with 2: second")


async def test_subprocess_environment_is_only_what_the_config_gives(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAWGATE_TOKEN", TOKEN)
    monkeypatch.setenv("SOME_PROCESS_SECRET", "do-not-leak")
    gw = await start_gateway(
        token=TOKEN,
        mcp_servers={"t": own_stdio(env={"GIVEN": "by-config"})},
        agents={"main": {"tools": ["t.env", "t.env_names"]}},
    )
    async with Client(gw.url, token=TOKEN, scopes=ADMIN, max_reconnect_attempts=0) as c:
        out = await c.call("tools.invoke", {"tool": "t.env_names"})
        names = set(out["result"]["structuredContent"]["result"])
        assert "GIVEN" in names and "PATH" in names
        assert not names & {"CLAWGATE_TOKEN", "SOME_PROCESS_SECRET"}
        given = await c.call("tools.invoke", {"tool": "t.env", "args": {"name": "GIVEN"}})
        assert given["result"]["structuredContent"]["result"] == "by-config"
        assert TOKEN not in json.dumps(out)


async def test_killed_server_gives_an_error_result_and_restarts(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        mcp_servers={"t": own_stdio()},
        mcp_restart_base_s=0,
        agents={"main": {"tools": ["t.pid", "t.crash"]}},
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        first = await c.run_agent("[[tool:t.pid {}]]", sessionKey="agent:main:a")
        pid1 = first["result"]["payloads"][0]["text"]
        final, events = await run_events(c, "[[tool:t.crash {}]]", sessionKey="agent:main:b")
        assert final["status"] == "ok"  # the run goes on with the error as the tool's result
        crashed = tool_data(events, "result")[0]
        assert crashed["isError"] and "failed" in crashed["result"]["error"]
        again = await c.run_agent("[[tool:t.pid {}]]", sessionKey="agent:main:c")
        assert again["status"] == "ok"
        assert again["result"]["payloads"][0]["text"] != pid1
    stats = gw.gateway.mcp.stats()["t"]
    assert stats["starts"] == 2 and stats["connected"]


async def test_restart_waits_out_the_backoff_on_the_clock(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    gw = await start_gateway(
        mcp_servers={"t": own_stdio()},
        mcp_restart_base_s=30,
        agents={"main": {"tools": ["t.pid", "t.crash"]}},
        token=TOKEN,
    )
    async with Client(gw.url, token=TOKEN, scopes=ADMIN, max_reconnect_attempts=0) as c:
        crashed = await c.call("tools.invoke", {"tool": "t.crash"})
        assert crashed["ok"] is False
        # The catalog lists no tools of a server waiting out its backoff; a call says why.
        assert (await c.call("tools.catalog", {}))["tools"] == []
        clock.advance(31)
        back = await c.call("tools.invoke", {"tool": "t.pid"})
        assert back["ok"] is True
    assert gw.gateway.mcp.stats()["t"]["starts"] == 2


@contextlib.contextmanager
def http_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, TEST_SERVER, "http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            time.sleep(0.1)  # waiting for a process to listen, not for a TTL
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def http_url() -> Iterator[str]:
    with http_server() as url:
        yield url


async def test_http_server_oversized_result_is_capped_with_a_marker(
    start_gateway: GatewayFactory, http_url: str
) -> None:
    gw = await start_gateway(
        mcp_servers={"h": {"url": http_url, "headers": {"X-Test": "1"}}},
        agents={"main": {"tools": ["h.big", "h.echo"], "tool_result_max_bytes": 300}},
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final, events = await run_events(c, '[[tool:h.big {"size": 200000}]]')
        assert final["status"] == "ok"
        result = tool_data(events, "result")[0]
        assert result["truncated"] is True
        assert isinstance(result["result"], str) and len(result["result"].encode()) < 400
        assert "[truncated: 300 of " in result["result"]
        history = await c.call("chat.history", {"sessionKey": "agent:main:main"})
        # The model was given the capped text with the marker (the scripted model echoes it).
        assert "[truncated: 300 of " in history["messages"][-1]["content"]
        small = await c.run_agent('[[tool:h.echo {"text": "over http"}]]', sessionKey="agent:main:s")
        assert "over http" in small["result"]["payloads"][0]["text"]


async def test_hanging_tool_times_out_on_the_clock(
    start_gateway: GatewayFactory, http_url: str, clock: FakeClock
) -> None:
    gw = await start_gateway(
        mcp_servers={"h": {"url": http_url}},
        agents={"main": {"tools": ["h.hang", "h.echo"], "tool_timeout_s": 5}},
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        events: list[dict[str, Any]] = []

        async def consume() -> None:
            async for frame in c.stream_agent("[[tool:h.hang {}]]"):
                events.append(frame)

        task = asyncio.create_task(consume())
        deadline = time.monotonic() + 30
        while not tool_data(events, "start") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert tool_data(events, "start"), "the tool call never started"
        await advance_until(clock, task.done, "the hung tool call to time out", step_s=5)
        task.result()
        result = tool_data(events, "result")[0]
        assert result["isError"] and "timed out after 5 s" in result["result"]["error"]
        # The server is still up for the next call.
        ok = await c.run_agent('[[tool:h.echo {"text": "still here"}]]', sessionKey="agent:main:n")
        assert "still here" in ok["result"]["payloads"][0]["text"]
    await settle(gw.gateway)
    assert gw.gateway.registry.sizes()["mcp_calls_in_flight"] == 0


async def test_failing_tool_and_read_scope_and_unknown_tool_on_invoke(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        token=TOKEN,
        tokens={"reader": {"token": "reader-t0ken-0123456789", "scopes": ["operator.read"]}},
        mcp_servers={"t": own_stdio()},
        agents={"main": {"tools": ["t.fail", "t.echo"]}},
    )
    async with Client(gw.url, token=TOKEN, scopes=ADMIN, max_reconnect_attempts=0) as c:
        failed = await c.call("tools.invoke", {"tool": "t.fail"})
        assert failed["ok"] is False
        with pytest.raises(ClientError) as err:
            await c.call("tools.invoke", {"tool": "t.pid"})
        assert err.value.code == "INVALID_REQUEST" and err.value.details["field"] == "tool"
    async with Client(
        gw.url, token="reader-t0ken-0123456789", scopes=["operator.read"], max_reconnect_attempts=0
    ) as reader:
        with pytest.raises(ClientError) as err:
            await reader.call("tools.invoke", {"tool": "t.echo", "args": {"text": "x"}})
        assert err.value.code in ("FORBIDDEN", "UNAUTHORIZED")


async def test_thousand_tool_runs_leave_no_tool_entry_behind(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mcp_servers={"t": own_stdio()}, agents={"main": {"tools": ["t.echo"]}})
    g = gw.gateway
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        await c.run_agent('[[tool:t.echo {"text": "warm"}]]', sessionKey="agent:main:s0")
        await settle(g)
        baseline = g.registry.sizes()
        tracked = g.registry.tracked_entries()

        async def lane(n: int) -> None:
            for i in range(100):
                final = await c.run_agent(
                    f'[[tool:t.echo {{"text": "r{n}-{i}"}}]]', sessionKey=f"agent:main:s{n}"
                )
                assert final["status"] == "ok" and f"r{n}-{i}" in final["result"]["payloads"][0]["text"]

        await asyncio.gather(*(lane(n) for n in range(10)))
        await settle(g)
    after = g.registry.sizes()
    for name in ("mcp_sessions", "mcp_calls_in_flight", "runs_active"):
        assert after[name] == baseline[name], name
    assert g.registry.tracked_entries() == tracked
    stats = g.mcp.stats()["t"]
    assert stats["starts"] == 1 and stats["callsInFlight"] == 0


async def test_http_tools_invoke_needs_admin(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        token=TOKEN,
        tokens={"writer": {"token": "writer-t0ken-0123456789", "scopes": ["operator.write"]}},
        mcp_servers={"t": own_stdio()},
        agents={"main": {"tools": ["t.echo"]}},
    )
    body = {"tool": "t.echo", "args": {"text": "over http"}}
    async with httpx.AsyncClient(base_url=gw.http_url, timeout=30) as http:
        r = await http.post("/tools/invoke", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        assert r.json()["ok"] is True and r.json()["result"]["structuredContent"] == {"result": "over http"}
        r = await http.post(
            "/tools/invoke", json=body, headers={"Authorization": "Bearer writer-t0ken-0123456789"}
        )
        assert r.status_code == 403
        r = await http.post(
            "/tools/invoke", json={"tool": "t.pid"}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "tool"


async def test_server_that_dies_while_idle_is_restarted_by_the_next_call(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(
        token=TOKEN,
        mcp_servers={"t": own_stdio()},
        mcp_restart_base_s=0,
        agents={"main": {"tools": ["t.pid"]}},
    )
    async with Client(gw.url, token=TOKEN, scopes=ADMIN, max_reconnect_attempts=0) as c:
        pid = (await c.call("tools.invoke", {"tool": "t.pid"}))["result"]["structuredContent"]["result"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while gw.gateway.mcp.stats()["t"]["connected"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not gw.gateway.mcp.stats()["t"]["connected"]  # seen at once, not by the next call
        final = await c.run_agent("[[tool:t.pid {}]]")
        assert final["status"] == "ok"
        assert str(pid) not in final["result"]["payloads"][0]["text"]
        assert '"status": "ok"' in final["result"]["payloads"][0]["text"]
    assert gw.gateway.mcp.stats()["t"]["starts"] == 2
