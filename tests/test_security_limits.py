"""Security limits through a real gateway: memory bounded in bytes (reply cap, byte-bounded caches,
a default memory budget, chat.history paged under maxPayload), ping floods, pre-auth socket
exhaustion, and attachment / state-dir hardening."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from clawgate.agent.replycap import TRUNCATED_MARKER
from clawgate.client import Client, ClientError
from clawgate.server.serve import RunningGateway
from clawgate.sessions.history import HISTORY_CLIPPED_MARKER
from clawgate.settings import (
    MEMORY_BUDGET_CEILING,
    MEMORY_BUDGET_FLOOR,
    Settings,
    default_memory_budget,
)
from clawgate.store.records import TranscriptMessage
from conftest import GatewayFactory, settle, unique_prefix

MiB = 1024 * 1024


def reply_text(final: dict[str, Any]) -> str:
    payloads = final["result"]["payloads"]
    return str(payloads[0]["text"]) if payloads else ""


# -- provider output is bounded per run -------------------------------------------------------------
async def test_reply_over_max_reply_bytes_is_cut_with_a_visible_marker(
    start_gateway: GatewayFactory,
) -> None:
    rg = await start_gateway(max_reply_bytes=4096)
    key = "agent:main:big"
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("[[size:100000]] [[chunks:25]]", session_key=key, idempotency_key="big-1")
        assert final["status"] == "ok"
        text = reply_text(final)
        assert text.endswith(TRUNCATED_MARKER)
        assert len(text.encode()) == 4096 + len(TRUNCATED_MARKER.encode())
        # The transcript keeps the same bounded text, not what the provider tried to send.
        await settle(rg.gateway)
        page = await c.call("chat.history", {"sessionKey": key})
        assert page["messages"][-1]["role"] == "assistant"
        assert page["messages"][-1]["content"] == text


async def test_reply_cap_cuts_on_a_character_boundary(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_reply_bytes=1025)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        # 2-byte characters: byte 1025 falls in the middle of one, which is dropped whole.
        final = await c.run_agent("[[reply:" + "é" * 2000 + "]]", idempotency_key="utf8-1")
    text = reply_text(final)
    assert text == "é" * 512 + TRUNCATED_MARKER


async def test_reply_under_the_cap_is_untouched(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_reply_bytes=4096)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("[[size:4096]] [[chunks:3]]", idempotency_key="fits-1")
    assert len(reply_text(final)) == 4096
    assert TRUNCATED_MARKER not in reply_text(final)


# -- caches are bounded in bytes ------------------------------------------------------------------------
async def test_run_result_cache_is_bounded_in_bytes(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(run_result_max_bytes=64 * 1024)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(12):
            final = await c.run_agent("[[size:20000]]", idempotency_key=f"cache-{i}")
            assert final["status"] == "ok"
        await settle(gw)
        assert gw.runs.results.bytes <= 64 * 1024
        assert 0 < len(gw.runs.results) < 12  # entries alone (run_result_max 5000) would keep all
        # An evicted result is still answered, from the store.
        waited = await c.call("agent.wait", {"runId": "cache-0", "timeoutMs": 0})
        assert waited["status"] == "ok"
        status = await c.call("status")
    assert status["memory"]["runResultBytes"] == gw.runs.results.bytes


async def test_session_cache_is_bounded_in_bytes(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(session_cache_max_bytes=4096)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(30):
            await c.call("sessions.patch", {"key": f"agent:main:s{i}", "label": "x" * 60})
    assert 0 < len(gw.sessions.cache) < 30
    assert gw.sessions.cache.bytes <= 4096


# -- the memory budget is on by default -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("total", "budget"),
    [
        (256 * MiB, 256 * MiB),  # never more than the machine has
        (1024 * MiB, MEMORY_BUDGET_FLOOR),
        (8 * 1024 * MiB, 4 * 1024 * MiB),
        (256 * 1024 * MiB, MEMORY_BUDGET_CEILING),
    ],
)
def test_default_memory_budget_is_derived_from_ram(total: int, budget: int) -> None:
    assert default_memory_budget(total) == budget


async def test_memory_budget_is_on_by_default(start_gateway: GatewayFactory) -> None:
    assert Settings().memory_budget_bytes is None
    rg = await start_gateway()
    assert rg.gateway.admission.memory_budget_bytes > 0
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        status = await c.call("status")
    assert status["memory"]["budgetBytes"] == rg.gateway.admission.memory_budget_bytes
    # 0 still turns the check off.
    off = await start_gateway(memory_budget_bytes=0)
    assert off.gateway.admission.memory_budget_bytes == 0


# -- chat.history is paged by bytes under maxPayload -----------------------------------------------------
async def open_ws(url: str) -> ClientConnection:
    return await websockets.connect(url, ping_interval=None, open_timeout=5, close_timeout=2, max_size=None)


async def connected(url: str) -> ClientConnection:
    ws = await open_ws(url)
    challenge = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert challenge["event"] == "connect.challenge"
    await ws.send(json.dumps({"type": "req", "id": "c1", "method": "connect", "params": CONNECT}))
    hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert hello["ok"] is True, hello
    return ws


CONNECT = {
    "minProtocol": 3,
    "maxProtocol": 4,
    "client": {"id": "test", "version": "1", "platform": "linux", "mode": "cli"},
    "role": "operator",
    "scopes": ["operator.read", "operator.write"],
}


async def raw_call(ws: ClientConnection, method: str, params: dict[str, Any], req_id: str) -> str:
    """The raw text of the response frame (events skipped)."""
    await ws.send(json.dumps({"type": "req", "id": req_id, "method": method, "params": params}))
    while True:
        text = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(text, str)
        if json.loads(text)["type"] == "res":
            return text


def transcript(key: str) -> list[TranscriptMessage]:
    """40 messages: plain, JSON-escaping heavy (quotes, control characters, non-ASCII), one huge."""
    out = []
    for i in range(40):
        if i == 17:
            content = "H" * 100_000
        elif i % 3 == 0:
            content = f"{i}:" + '"\\x01\u00e9' * 300
        else:
            content = f"{i}:" + "plain text " * 250
        out.append(
            TranscriptMessage(
                session_key=key,
                role="user" if i % 2 else "assistant",
                content=content,
                ts=1000.0 + i,
                run_id=f"r{i}",
            )
        )
    return out


PAGE_LIMIT = 16 * 1024


async def test_chat_history_pages_by_bytes_under_max_payload(start_gateway: GatewayFactory) -> None:
    await check_history_paging(await start_gateway(max_payload_bytes=PAGE_LIMIT))


async def test_chat_history_pages_by_bytes_on_redis(start_gateway: GatewayFactory, redis_url: str) -> None:
    rg = await start_gateway(max_payload_bytes=PAGE_LIMIT, store=redis_url, redis_prefix=unique_prefix())
    await check_history_paging(rg)


async def check_history_paging(rg: RunningGateway) -> None:
    limit_bytes = PAGE_LIMIT
    gw = rg.gateway
    key = "agent:main:paged"
    written = transcript(key)
    for msg in written:
        gw.store.append_message(msg)
    await gw.store.flush()

    ws = await connected(rg.url)
    pages: list[dict[str, Any]] = []
    params: dict[str, Any] = {"sessionKey": key, "limit": 1000}
    for n in range(100):
        text = await raw_call(ws, "chat.history", params, f"h{n}")
        assert len(text.encode()) <= limit_bytes  # no frame over maxPayload, ever
        payload = json.loads(text)["payload"]
        pages.append(payload)
        if "nextCursor" not in payload:
            break
        params = {"sessionKey": key, "limit": 1000, "cursor": payload["nextCursor"]}
    await ws.close()

    assert len(pages) > 3
    assert all(p["truncated"] for p in pages[:-1])  # each full page was cut by bytes, not by limit
    # Newest page first; within a page oldest first: together, the whole transcript once, in order.
    got = [m for page in reversed(pages) for m in page["messages"]]
    assert [m["runId"] for m in got] == [m.run_id for m in written]
    for m, w in zip(got, written, strict=True):
        if w.run_id == "r17":
            assert m["truncated"] is True
            assert m["content"].endswith(HISTORY_CLIPPED_MARKER)
            assert w.content.startswith(m["content"][: -len(HISTORY_CLIPPED_MARKER)])
        else:
            assert m["content"] == w.content and "truncated" not in m
            assert m["role"] == w.role and m["ts"] == int(w.ts * 1000)


async def test_chat_history_limit_still_means_the_newest_messages(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway()
    key = "agent:main:lim"
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(4):
            await c.run_agent(f"[[reply:answer {i}]] q{i}", session_key=key, idempotency_key=f"lim-{i}")
        await settle(rg.gateway)
        last = await c.call("chat.history", {"sessionKey": key, "limit": 3})
        assert [m["content"] for m in last["messages"]] == ["answer 2", "[[reply:answer 3]] q3", "answer 3"]
        assert last["truncated"] is False
        older = await c.call("chat.history", {"sessionKey": key, "limit": 3, "cursor": last["nextCursor"]})
        everything = await c.call("chat.history", {"sessionKey": key})
    assert older["messages"] + last["messages"] == everything["messages"][-6:]
    assert len(everything["messages"]) == 8 and "nextCursor" not in everything


@pytest.mark.parametrize("cursor", ["abc", "-1", "1e3", ""])
async def test_chat_history_refuses_a_bad_cursor(client: Client, cursor: str) -> None:
    with pytest.raises(ClientError) as err:
        await client.call("chat.history", {"sessionKey": "agent:main:x", "cursor": cursor})
    assert err.value.code == "INVALID_REQUEST"
