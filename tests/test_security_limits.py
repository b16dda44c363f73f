"""Security limits through a real gateway: memory bounded in bytes (reply cap, byte-bounded caches,
a default memory budget, chat.history paged under maxPayload), ping floods, pre-auth socket
exhaustion, and attachment / state-dir hardening."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from clawgate.agent.replycap import TRUNCATED_MARKER, ReplyCap
from clawgate.client import Client, ClientError
from clawgate.errors import InvalidRequest
from clawgate.protocol.schemas import Attachment
from clawgate.server.fdlimit import FD_RESERVE, FdLimitError, ensure_fd_limit, plan_fd_limit
from clawgate.server.gateway import Gateway
from clawgate.server.serve import RunningGateway
from clawgate.server.sockets import SocketLedger
from clawgate.server.statedir import StateDirError, check_state_dir
from clawgate.sessions.history import HISTORY_CLIPPED_MARKER
from clawgate.settings import (
    MEMORY_BUDGET_CEILING,
    MEMORY_BUDGET_FLOOR,
    Settings,
    default_memory_budget,
)
from clawgate.state.clock import FakeClock
from clawgate.store.records import TranscriptMessage
from clawgate.subagents import attachments
from clawgate.testing import clean_env
from conftest import GatewayFactory, make_settings, settle, unique_prefix
from openai_stub import StubBehaviour, run_stub
from test_settings_cli import CLAWGATE, run_cli

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


# -- raw sockets ----------------------------------------------------------------------------------------------
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
HALF_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def ping_frame(payload: bytes) -> bytes:
    """A masked client ping (RFC 6455: client frames are masked)."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x89, 0x80 | len(payload)]) + mask + masked


async def raw_socket(
    rg: RunningGateway, first: bytes = b"", *, source: str = "127.0.0.1", rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", rg.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True when the gateway closed (or reset) the socket; data it sent first is skipped."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while loop.time() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
            if not chunk:
                return True
    except TimeoutError:  # before OSError, of which it is a subclass
        return False
    except OSError:  # reset
        return True
    return False


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what}: not reached in time"
        await asyncio.sleep(0.005)


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.transport.abort()


# -- ping flood ----------------------------------------------------------------------------------------------
async def test_a_peer_that_pings_and_never_reads_is_dropped(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_buffered_bytes=64 * 1024)
    ledger = rg.gateway.sockets
    _, writer = await raw_socket(rg, UPGRADE, rcvbuf=4096)
    batch = ping_frame(b"p" * 125) * 500
    sent = 0
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        # At most 200,000 pings (26 MB); without the limit every one of them gets a pong queued.
        while sent < 200_000 and not ledger.ping_floods:
            writer.write(batch)
            await asyncio.wait_for(writer.drain(), 10)
            sent += 500
    await wait_for(lambda: ledger.ping_floods == 1, "ping flood detected")
    await wait_for(lambda: ledger.open == 0, "socket released")
    close_all([writer])
    # A peer that reads its pongs is not affected.
    async with websockets.connect(rg.url, ping_interval=None) as ws:
        for _ in range(200):
            await ws.ping()
        assert await asyncio.wait_for(ws.ping(), 5) is not None
    assert ledger.ping_floods == 1


# -- pre-auth exhaustion ---------------------------------------------------------------------------------------
async def test_half_sent_headers_are_dropped_after_the_header_timeout(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(http_header_timeout_s=5)
    ledger = rg.gateway.sockets
    socks = [await raw_socket(rg, HALF_HEAD) for _ in range(3)]
    await wait_for(lambda: ledger.open == 3 and ledger.pending == 3, "sockets counted")
    clock.advance(4)
    await asyncio.sleep(0.05)
    assert ledger.open == 3  # not before the deadline
    clock.advance(2)
    for reader, _ in socks:
        assert await closed_by_server(reader)
    await wait_for(lambda: ledger.open == 0 and ledger.pending == 0, "sockets released")
    assert ledger.header_timeouts == 3
    close_all([w for _, w in socks])


async def test_a_request_body_that_never_finishes_gets_408_after_the_body_timeout(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """A complete head, then a body dribbled and never finished: the header timeout no longer
    applies, so without a body deadline the socket and its request task were held forever
    (one address could hold them up to the descriptor limit). The body must arrive within
    `http_body_timeout_s`: then 408 with the structured error, and the socket is closed."""
    rg = await start_gateway(http_header_timeout_s=5, http_body_timeout_s=30)
    ledger = rg.gateway.sockets
    head = (
        b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    reader, writer = await raw_socket(rg, head + b'{"message": "')
    await wait_for(lambda: ledger.open == 1 and ledger.pending == 0, "head read")
    clock.advance(29)
    writer.write(b"still coming")
    await writer.drain()
    await asyncio.sleep(0.05)
    assert ledger.open == 1  # not before the deadline, though the header timeout has passed
    clock.advance(2)
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 408")
    rest = await asyncio.wait_for(reader.read(65536), 5)
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["ok"] is False and body["error"]["code"] == "INVALID_REQUEST"
    assert "httpBodyTimeoutS" in body["error"]["details"]
    assert await closed_by_server(reader)
    await wait_for(lambda: ledger.open == 0, "socket released")
    close_all([writer])
    # The gateway is fine: a whole body in time is served.
    async with httpx.AsyncClient(base_url=rg.http_url) as http:
        r = await http.post("/v1/runs", json={"message": "[[reply:ok]]"})
        assert r.status_code != 408


async def test_keep_alive_sockets_get_the_header_deadline_again(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(http_header_timeout_s=5)
    ledger = rg.gateway.sockets
    reader, writer = await raw_socket(rg, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(HALF_HEAD)  # then dribble the next request's head, never finishing it
    await writer.drain()
    clock.advance(6)
    assert await closed_by_server(reader)
    assert ledger.header_timeouts == 1
    close_all([writer])


async def test_accepted_sockets_are_capped_so_descriptors_cannot_run_out(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(
        max_connections=4,
        max_pending_handshakes=4,
        max_pending_handshakes_per_addr=100,
        http_header_timeout_s=5,
    )
    ledger = rg.gateway.sockets
    socks = [await raw_socket(rg, HALF_HEAD) for _ in range(30)]
    await wait_for(lambda: ledger.refused_total == 22, "sockets over the cap dropped")
    assert ledger.open == 8  # max_connections + max_pending_handshakes
    dropped = 0
    for reader, _ in socks:
        if await closed_by_server(reader, timeout=0.2):
            dropped += 1
    assert dropped == 22  # closed at once, not held until some timeout
    # The held ones are gone after the header timeout, and a client gets in.
    clock.advance(6)
    await wait_for(lambda: ledger.open == 0, "held sockets dropped")
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        assert (await c.call("health"))["ok"] is True
    close_all([w for _, w in socks])


async def test_one_address_cannot_take_every_pending_handshake_slot(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_pending_handshakes=8, max_pending_handshakes_per_addr=4)
    ledger = rg.gateway.sockets
    # Another host (127.0.0.2 is loopback too) upgrades ten sockets and never sends `connect`.
    idle = [await raw_socket(rg, UPGRADE, source="127.0.0.2") for _ in range(10)]
    await wait_for(lambda: ledger.refused_per_addr == 6, "sockets over the per-address cap dropped")
    assert ledger.pending_from("127.0.0.2") == 4
    # This host is not locked out, now.
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        assert (await c.call("health"))["ok"] is True
        assert ledger.pending_from("127.0.0.1") == 0  # connected: no longer pending
    assert rg.gateway.registry.sizes()["pending_addresses"] == 1
    close_all([w for _, w in idle])
    await wait_for(lambda: ledger.open == 0, "sockets released")
    assert rg.gateway.registry.sizes()["pending_addresses"] == 0


def test_fd_limit_plan() -> None:
    inf = resource.RLIM_INFINITY
    assert plan_fd_limit(soft=4096, hard=4096, needed=1200) is None
    assert plan_fd_limit(soft=1024, hard=4096, needed=1200) == 1200  # raised up to what is needed
    assert plan_fd_limit(soft=1024, hard=inf, needed=1200) == 1200
    with pytest.raises(FdLimitError, match="RLIMIT_NOFILE"):
        plan_fd_limit(soft=256, hard=1000, needed=1200)


def test_the_soft_fd_limit_is_raised_at_start(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    settings = make_settings(tmp_path, max_connections=900, max_pending_handshakes=100)
    needed = 900 + 100 + FD_RESERVE
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip("the hard limit of this machine is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert ensure_fd_limit(settings) == needed
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == needed
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_cli_refuses_max_connections_the_fd_limit_cannot_hold(tmp_path: Path) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run(
        [
            CLAWGATE,
            "gateway",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "s"),
            "--set",
            "max_connections=1000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        preexec_fn=low_limit,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "RLIMIT_NOFILE" in proc.stderr


# -- attachments and the state dir -----------------------------------------------------------------------------
def test_attachment_count_is_capped() -> None:
    many = [Attachment(name=f"f{i}", content="") for i in range(51)]
    with pytest.raises(InvalidRequest) as err:
        attachments.prepare(many, 5 * MiB, max_files=50)
    assert err.value.details == {"field": "params.attachments", "maxFiles": 50}
    assert len(attachments.prepare(many[:50], 5 * MiB, max_files=50)) == 50


async def test_spawn_with_too_many_files_writes_nothing(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    rg = await start_gateway(attachments_max_files=5)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        with pytest.raises(ClientError) as err:
            await c.spawn(
                "agent:main:att", "t", attachments=[{"name": f"e{i}", "content": ""} for i in range(500)]
            )
        assert err.value.code == "INVALID_REQUEST"
        assert err.value.details["maxFiles"] == 5
        ok = await c.spawn(
            "agent:main:att", "t", attachments=[{"name": f"e{i}", "content": ""} for i in range(5)]
        )
        assert ok["status"] == "accepted"
        await settle(rg.gateway)
    # `.owners` records which session owns each directory (retention deletes them together).
    runs = [d for d in (tmp_path / "state" / "attachments").iterdir() if not d.name.startswith(".")]
    assert [sorted(p.name for p in d.iterdir()) for d in runs] == [[f"e{i}" for i in range(5)]]


async def test_attachments_are_not_written_through_a_planted_link(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    rg = await start_gateway()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state" / "attachments").symlink_to(elsewhere)  # planted after start
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        with pytest.raises(ClientError) as err:
            await c.spawn("agent:main:att", "t", attachments=[{"name": "a.txt", "content": "secret"}])
        assert err.value.code == "UNAVAILABLE"
        assert (await c.call("health"))["ok"] is True
    assert list(elsewhere.iterdir()) == []


def test_write_refuses_a_linked_run_directory(tmp_path: Path) -> None:
    root = tmp_path / "att"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "run-1").symlink_to(elsewhere)
    with pytest.raises(OSError):
        attachments.write(root, "run-1", [("a.txt", b"x")])
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["clawgate.db", "clawgate.db-wal", "attachments"])
def test_gateway_refuses_a_link_in_its_state_dir(tmp_path: Path, name: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "target"
    target.mkdir() if name == "attachments" else target.write_bytes(b"")
    (state / name).symlink_to(target)
    with pytest.raises(StateDirError, match="symbolic link"):
        Gateway(make_settings(tmp_path))


def test_gateway_refuses_a_link_inside_attachments(tmp_path: Path) -> None:
    run = tmp_path / "state" / "attachments" / "run-1"
    run.mkdir(parents=True)
    (run / "a.txt").symlink_to("/etc/hostname")
    with pytest.raises(StateDirError, match="symbolic link"):
        check_state_dir(tmp_path / "state")


def test_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with pytest.raises(StateDirError, match="not by the gateway's user"):
        check_state_dir(tmp_path / "state", uid=os.geteuid() + 1)


def test_cli_exits_2_on_an_unsafe_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "clawgate.db").symlink_to(tmp_path / "elsewhere.db")
    proc = run_cli("gateway", "--port", "0", "--state-dir", str(state))
    assert proc.returncode == 2, proc.stderr
    assert "symbolic link" in proc.stderr
    assert not (tmp_path / "elsewhere.db").exists()


async def test_modes_of_existing_state_files_are_fixed_at_start(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    run = state / "attachments" / "old-run"
    run.mkdir(parents=True)
    (run / "a.txt").write_bytes(b"x")
    (state / "clawgate.db").write_bytes(b"")
    for path, mode in ((state, 0o755), (state / "attachments", 0o755), (run, 0o755)):
        path.chmod(mode)
    (run / "a.txt").chmod(0o644)
    (state / "clawgate.db").chmod(0o644)
    # Checked as the gateway is built, before it starts (at start the retention scan removes
    # `old-run`, an attachments directory nothing refers to).
    Gateway(make_settings(tmp_path), clock=FakeClock())
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (state, state / "attachments", run)} == {
        "state": 0o700,
        "attachments": 0o700,
        "old-run": 0o700,
    }
    assert stat.S_IMODE((run / "a.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "clawgate.db").stat().st_mode) == 0o600


async def test_openai_tool_call_arguments_are_bounded_too(start_gateway: GatewayFactory) -> None:
    # Text is cut by the agent loop; streamed tool-call arguments are buffered by the provider
    # until the turn ends, so an endless argument string must end the run instead.
    behaviour = StubBehaviour(tool_arguments_raw=json.dumps({"task": "x" * 200_000}))
    async with run_stub(behaviour) as base_url:
        rg = await start_gateway(
            provider="openai", openai_base_url=base_url, openai_model="stub", max_reply_bytes=4096
        )
        async with Client(rg.url, max_reconnect_attempts=0) as c:
            final = await c.run_agent("please call-tool", idempotency_key="oa-big-args")
            assert final["status"] == "error"
            assert "maxReplyBytes" in final["error"]
            assert rg.gateway.subagents.active_children("agent:main:main") == 0
        await rg.stop()


# -- pure parts ------------------------------------------------------------------------------------------------
def test_socket_ledger_counts_from_accept_to_close() -> None:
    ledger = SocketLedger(max_sockets=3, max_pending_per_addr=2)
    a1, a2 = ledger.admit("a"), ledger.admit("a")
    assert a1 is not None and a2 is not None
    assert ledger.admit("a") is None and ledger.refused_per_addr == 1  # third pending from "a"
    b = ledger.admit("b")
    assert b is not None
    assert ledger.admit("c") is None and ledger.refused_total == 1  # three open
    ledger.move(a1, "handshake")
    assert ledger.pending == 3  # still pending after the upgrade
    ledger.move(a1, "open")
    assert (ledger.pending, ledger.pending_from("a")) == (2, 1)
    ledger.release(a1)
    ledger.release(a1)  # idempotent
    ledger.move(a1, "head")  # a closed slot stays closed
    assert (ledger.open, ledger.pending) == (2, 2)
    ledger.release(a2)
    ledger.release(b)
    assert (ledger.open, ledger.pending, ledger.addresses()) == (0, 0, 0)


def test_reply_cap_forgets_a_retried_attempt() -> None:
    cap = ReplyCap(10)
    assert cap.take("12345678") == "12345678"
    mark = cap.used
    assert cap.take("abc") == "ab" + TRUNCATED_MARKER and cap.truncated
    cap.rewind(mark)  # the attempt failed and is retried: its text is not part of the reply
    assert not cap.truncated
    assert cap.take("xy") == "xy"
    assert cap.take("z") == TRUNCATED_MARKER
    assert cap.take("more") == ""
    assert ReplyCap(None).take("anything") == "anything"
