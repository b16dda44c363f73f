"""The wire protocol over a real WebSocket: handshake, negotiation, auth, error frames, limits.

These tests speak raw frames with the `websockets` library (not `clawgate.client.Client`,
which hides the protocol) against an in-process gateway on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from clawgate.server.ratelimit import TokenBucket
from clawgate.server.sendbuffer import SendBuffer
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle
from helpers import wait_until

READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"


# -- raw-frame helpers ---------------------------------------------------------------------------
async def open_ws(url: str, **kw: Any) -> ClientConnection:
    return await websockets.connect(url, ping_interval=None, open_timeout=5, close_timeout=2, **kw)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    assert isinstance(frame, dict)
    return frame


async def send(ws: ClientConnection, obj: Any) -> None:
    await ws.send(json.dumps(obj))


async def recv_res(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """The next `res` frame, skipping events (ticks, run events)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await recv(ws, max(0.01, deadline - loop.time()))
        if frame["type"] == "res":
            return frame


async def wait_closed(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read (and drop) frames until the server closes; return the close code it sent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), max(0.01, deadline - loop.time()))
    return ws.close_code


def connect_params(**over: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "minProtocol": 3,
        "maxProtocol": 4,
        "client": {"id": "test", "version": "1", "platform": "linux", "mode": "cli"},
        "role": "operator",
        "scopes": [READ, WRITE],
    }
    params.update(over)
    return params


async def handshake(ws: ClientConnection, **over: Any) -> dict[str, Any]:
    """Read the challenge, send `connect`, return the answer frame."""
    challenge = await recv(ws)
    assert challenge["event"] == "connect.challenge"
    await send(ws, {"type": "req", "id": "c1", "method": "connect", "params": connect_params(**over)})
    return await recv(ws)


async def connected(url: str, **over: Any) -> ClientConnection:
    ws = await open_ws(url)
    hello = await handshake(ws, **over)
    assert hello["ok"] is True, hello
    return ws


async def call(ws: ClientConnection, method: str, params: Any = None, req_id: str = "h") -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "req", "id": req_id, "method": method}
    if params is not None:
        frame["params"] = params
    await send(ws, frame)
    return await recv_res(ws)


async def assert_healthy(ws: ClientConnection) -> None:
    req_id = f"health-{uuid.uuid4().hex[:6]}"
    res = await call(ws, "health", {}, req_id)
    assert res["id"] == req_id
    assert res["ok"] is True
    assert res["payload"]["ok"] is True


# -- handshake -----------------------------------------------------------------------------------
async def test_challenge_is_the_first_frame(gateway: RunningGateway, clock: FakeClock) -> None:
    async with await open_ws(gateway.url) as ws:
        frame = await recv(ws)
        assert frame["type"] == "event"
        assert frame["event"] == "connect.challenge"
        nonce = frame["payload"]["nonce"]
        assert str(uuid.UUID(nonce)) == nonce
        assert frame["payload"]["ts"] == int(clock.time() * 1000)
    async with await open_ws(gateway.url) as ws2:
        assert (await recv(ws2))["payload"]["nonce"] != nonce


@pytest.mark.parametrize(("lo", "hi", "expected"), [(3, 4, 4), (3, 3, 3), (4, 4, 4), (1, 9, 4), (2, 3, 3)])
async def test_protocol_negotiation_picks_highest_common(
    gateway: RunningGateway, lo: int, hi: int, expected: int
) -> None:
    async with await open_ws(gateway.url) as ws:
        hello = await handshake(ws, minProtocol=lo, maxProtocol=hi)
        assert hello["ok"] is True
        assert hello["id"] == "c1"
        assert hello["payload"]["type"] == "hello-ok"
        assert hello["payload"]["protocol"] == expected


@pytest.mark.parametrize(
    ("lo", "hi", "field"),
    [(5, 6, "params.maxProtocol"), (1, 2, "params.maxProtocol"), (4, 3, "params.minProtocol")],
)
async def test_no_common_protocol_is_refused_and_closed(
    gateway: RunningGateway, lo: int, hi: int, field: str
) -> None:
    async with await open_ws(gateway.url) as ws:
        res = await handshake(ws, minProtocol=lo, maxProtocol=hi)
        assert res["ok"] is False
        assert res["id"] == "c1"
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert res["error"]["details"]["field"] == field
        assert await wait_closed(ws) == 1008
    assert gateway.gateway.pending_handshakes == 0


async def test_hello_ok_reports_grant_policy_and_features(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_payload_bytes=4096, max_buffered_bytes=100_000, tick_interval_s=7.5)
    async with await open_ws(rg.url) as ws:
        hello = await handshake(ws, scopes=[WRITE])
        payload = hello["payload"]
        # write implies read; admin was not asked for
        assert payload["auth"] == {"method": "none", "role": "operator", "scopes": [READ, WRITE]}
        assert payload["policy"] == {"maxPayload": 4096, "maxBufferedBytes": 100_000, "tickIntervalMs": 7500}
        assert payload["server"]["connId"] in rg.gateway.connections
        assert {"connect.challenge", "agent", "chat", "tick", "shutdown"} <= set(
            payload["features"]["events"]
        )
        assert {"health", "status", "agent", "agent.wait", "chat.send", "sessions.spawn"} <= set(
            payload["features"]["methods"]
        )
        await assert_healthy(ws)
    async with await open_ws(rg.url) as ws:
        hello = await handshake(ws, scopes=[ADMIN])
        assert hello["payload"]["auth"]["scopes"] == [ADMIN, READ, WRITE]


async def test_scopes_default_to_read_when_absent_and_unknown_only_is_refused(
    gateway: RunningGateway,
) -> None:
    # Omitted scopes mean read only (a client that does not say what it needs gets the least).
    params = connect_params()
    del params["scopes"]
    async with await open_ws(gateway.url) as ws:
        await recv(ws)
        await send(ws, {"type": "req", "id": "c", "method": "connect", "params": params})
        hello = await recv(ws)
        assert hello["payload"]["auth"]["scopes"] == [READ]
    async with await open_ws(gateway.url) as ws:
        res = await handshake(ws, scopes=["operator.everything"])
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert res["error"]["details"]["field"] == "params.scopes"
        assert await wait_closed(ws) == 1008


@pytest.mark.parametrize(
    "auth", [None, {}, {"token": "wrong-token"}, {"token": ""}, {"token": "s3cret-token-"}]
)
async def test_token_required_missing_or_wrong_is_unauthorized(
    start_gateway: GatewayFactory, auth: dict[str, Any] | None
) -> None:
    rg = await start_gateway(token="s3cret-token")
    async with await open_ws(rg.url) as ws:
        over = {} if auth is None else {"auth": auth}
        res = await handshake(ws, **over)
        assert res["ok"] is False
        assert res["id"] == "c1"
        assert res["error"]["code"] == "UNAUTHORIZED"
        assert await wait_closed(ws) == 1008
    assert len(rg.gateway.connections) == 0
    assert rg.gateway.pending_handshakes == 0


async def test_right_token_is_accepted(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(token="s3cret-token")
    async with await connected(rg.url, auth={"token": "s3cret-token"}) as ws:
        await assert_healthy(ws)
    async with await open_ws(rg.url) as ws:
        hello = await handshake(ws, auth={"token": "s3cret-token"})
        assert hello["payload"]["auth"]["method"] == "token"


@pytest.mark.parametrize("method", ["health", "agent", "status", "nope"])
async def test_method_before_connect_is_refused_and_closed(gateway: RunningGateway, method: str) -> None:
    async with await open_ws(gateway.url) as ws:
        await recv(ws)
        await send(ws, {"type": "req", "id": "early", "method": method, "params": {}})
        res = await recv(ws)
        assert res == {
            "type": "res",
            "id": "early",
            "ok": False,
            "error": {
                "code": "INVALID_REQUEST",
                "message": f"first request must be connect, got {method!r}",
                "details": {"field": "method"},
            },
        }
        assert await wait_closed(ws) == 1008
    assert gateway.gateway.pending_handshakes == 0


@pytest.mark.parametrize(
    "frame",
    [
        "not json at all",
        "[1, 2]",
        '{"type": "req", "id": "c1", "method": "connect", "params": {"minProtocol": "3", "maxProtocol": 4}}',
    ],
)
async def test_bad_first_frame_closes(gateway: RunningGateway, frame: str) -> None:
    async with await open_ws(gateway.url) as ws:
        await recv(ws)
        await ws.send(frame)
        res = await recv(ws)
        assert res["ok"] is False
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert await wait_closed(ws) == 1008


async def test_binary_first_frame_closes(gateway: RunningGateway) -> None:
    async with await open_ws(gateway.url) as ws:
        await recv(ws)
        await ws.send(
            json.dumps({"type": "req", "id": "c1", "method": "connect", "params": connect_params()}).encode()
        )
        res = await recv(ws)
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert await wait_closed(ws) == 1008


async def test_handshake_timeout_closes_with_1008(gateway: RunningGateway, clock: FakeClock) -> None:
    timeout = gateway.gateway.settings.handshake_timeout_s
    async with await open_ws(gateway.url) as ws:
        await recv(ws)
        clock.advance(timeout + 0.5)
        res = await recv(ws)
        assert res["ok"] is False
        assert res["id"] is None
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert "handshake timeout" in res["error"]["message"]
        assert await wait_closed(ws) == 1008
    assert gateway.gateway.pending_handshakes == 0


async def test_handshake_just_before_timeout_succeeds_and_timer_is_cancelled(
    gateway: RunningGateway, clock: FakeClock
) -> None:
    timeout = gateway.gateway.settings.handshake_timeout_s
    async with await open_ws(gateway.url) as ws:
        await recv(ws)
        clock.advance(timeout - 0.5)
        await send(ws, {"type": "req", "id": "c1", "method": "connect", "params": connect_params()})
        assert (await recv(ws))["ok"] is True
        # The deadline passes after a successful handshake: nothing happens.
        clock.advance(timeout * 3)
        await assert_healthy(ws)
        assert len(gateway.gateway.connections) == 1


async def test_connection_counts_return_to_zero(gateway: RunningGateway) -> None:
    gw = gateway.gateway
    sockets = [await connected(gateway.url) for _ in range(3)]
    half = await open_ws(gateway.url)
    await recv(half)
    assert len(gw.connections) == 4
    assert gw.pending_handshakes == 1
    assert len(gw.bus.sinks) == 3
    for ws in [*sockets, half]:
        await ws.close()
    await wait_until(lambda: not gw.connections and not gw.bus.sinks)
    assert len(gw.connections) == 0
    assert len(gw.bus.sinks) == 0
    assert gw.pending_handshakes == 0


# -- errors after the handshake: answered, connection stays open ---------------------------------
async def test_malformed_json_gets_an_error_and_stays_open(gateway: RunningGateway) -> None:
    async with await connected(gateway.url) as ws:
        # A truncated frame whose leading `id` is readable gets it echoed (docs/protocol.md).
        for text, echo in [
            ("{not json", None),
            ('{"type": "req", "id": "x"', "x"),
            ("", None),
            ("\x00\x01", None),
            ("nul", None),
        ]:
            await ws.send(text)
            res = await recv_res(ws)
            assert res["id"] == echo
            assert res["ok"] is False
            assert res["error"]["code"] == "INVALID_REQUEST"
            assert res["error"]["message"].startswith("malformed JSON")
            await assert_healthy(ws)


@pytest.mark.parametrize(
    ("frame", "echo", "field"),
    [
        ({"type": "req", "id": "m1", "params": {}}, "m1", "method"),
        ({"type": "res", "id": "m2", "method": "health"}, "m2", "type"),
        ({"type": "event", "id": "m3", "method": "health"}, "m3", "type"),
        ({"id": "m4", "method": "health"}, "m4", "type"),
        ({"type": "req", "id": 5, "method": "health"}, None, "id"),
        ({"type": "req", "id": None, "method": "health"}, None, "id"),
        ({"type": "req", "method": "health"}, None, "id"),
        ({"type": "req", "id": "m5", "method": 7}, "m5", "method"),
        ({"type": "req", "id": "m6", "method": ["health"]}, "m6", "method"),
        ([{"type": "req", "id": "m7", "method": "health"}], None, "frame"),
        ("just a string", None, "frame"),
        (42, None, "frame"),
        (None, None, "frame"),
    ],
)
async def test_wrong_frame_shapes(gateway: RunningGateway, frame: Any, echo: str | None, field: str) -> None:
    async with await connected(gateway.url) as ws:
        await send(ws, frame)
        res = await recv_res(ws)
        assert res["ok"] is False
        assert res["id"] == echo
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert res["error"]["details"]["field"] == field
        await assert_healthy(ws)


async def test_unknown_method_names_the_method(gateway: RunningGateway) -> None:
    async with await connected(gateway.url) as ws:
        res = await call(ws, "no.such.method", {}, "u1")
        assert res["id"] == "u1"
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert res["error"]["details"] == {"method": "no.such.method"}
        assert "no.such.method" in res["error"]["message"]
        await assert_healthy(ws)


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("agent", {"message": 5, "idempotencyKey": "k1"}, "params.message"),
        ("agent", {"message": "hi"}, "params.idempotencyKey"),
        ("agent", {"idempotencyKey": "k1"}, "params.message"),
        ("agent", {"message": "hi", "idempotencyKey": ""}, "params.idempotencyKey"),
        ("agent", {"message": "hi", "idempotencyKey": "k", "sessionKey": "bogus"}, "params.sessionKey"),
        ("agent", {"message": "hi", "idempotencyKey": "k", "timeout": -1}, "params.timeout"),
        ("agent", {"message": "hi", "idempotencyKey": "k", "timeout": "10"}, "params.timeout"),
        ("agent", [1, 2], "params"),
        ("agent", "message", "params"),
        ("agent.wait", {"runId": "r", "timeoutMs": -5}, "params.timeoutMs"),
        ("chat.history", {"sessionKey": "agent:main:main", "limit": 0}, "params.limit"),
        ("events.subscribe", {"sessionKeys": ["agent:main:main", 3]}, "params.sessionKeys[1]"),
        ("sessions.spawn", {"sessionKey": "agent:main:main", "task": "t", "mode": "forever"}, "params.mode"),
        (
            "sessions.spawn",
            {"sessionKey": "agent:main:main", "task": "t", "attachments": [{"name": "a", "content": 1}]},
            "params.attachments[0].content",
        ),
    ],
)
async def test_bad_params_name_the_field(
    gateway: RunningGateway, method: str, params: Any, field: str
) -> None:
    async with await connected(gateway.url) as ws:
        res = await call(ws, method, params, "p1")
        assert res["id"] == "p1"
        assert res["ok"] is False
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert res["error"]["details"]["field"] == field
        await assert_healthy(ws)
    assert gateway.gateway.runs.totals == {"ok": 0, "error": 0, "timeout": 0, "aborted": 0}


async def test_unknown_params_are_ignored(gateway: RunningGateway) -> None:
    async with await connected(gateway.url) as ws:
        await send(
            ws,
            {
                "type": "req",
                "id": "a1",
                "method": "agent",
                "params": {"message": "hi", "idempotencyKey": "extra-1", "deliver": False, "channel": "x"},
            },
        )
        accepted = await recv_res(ws)
        assert accepted["ok"] is True
        assert accepted["payload"]["status"] == "accepted"
        assert accepted["payload"]["runId"] == "extra-1"
        final = await recv_res(ws)
        assert final["id"] == "a1"
        assert final["payload"]["status"] == "ok"
        assert final["payload"]["result"]["payloads"][0]["text"] == "ok: hi"
    await settle(gateway.gateway)


async def test_missing_params_means_empty_object(gateway: RunningGateway) -> None:
    async with await connected(gateway.url) as ws:
        res = await call(ws, "health", None, "np")
        assert res["ok"] is True
        res = await call(ws, "agent", None, "np2")
        assert res["error"]["details"]["field"] == "params.message"


async def test_binary_frame_after_handshake_is_refused_and_stays_open(gateway: RunningGateway) -> None:
    async with await connected(gateway.url) as ws:
        await ws.send(json.dumps({"type": "req", "id": "b1", "method": "health"}).encode())
        res = await recv_res(ws)
        assert res["id"] == "b1"
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert "binary" in res["error"]["message"]
        await ws.send(b"\xff\xfe\x00garbage")
        res = await recv_res(ws)
        assert res["id"] is None
        assert res["error"]["code"] == "INVALID_REQUEST"
        await assert_healthy(ws)


async def test_oversized_frame_is_refused_with_1009(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_payload_bytes=2048)
    async with await connected(rg.url) as ws:
        # Exactly at the limit is fine.
        pad = "x" * (
            2048 - len(json.dumps({"type": "req", "id": "ok1", "method": "health", "params": {"p": ""}}))
        )
        exact = json.dumps({"type": "req", "id": "ok1", "method": "health", "params": {"p": pad}})
        assert len(exact.encode()) == 2048
        await ws.send(exact)
        assert (await recv_res(ws))["ok"] is True
        big = json.dumps({"type": "req", "id": "big", "method": "health", "params": {"p": pad + "y"}})
        await ws.send(big)
        res = await recv_res(ws)
        assert res["ok"] is False
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert res["error"]["details"] == {"maxPayload": 2048, "size": 2049}
        assert await wait_closed(ws) == 1009


async def test_oversized_multibyte_frame_is_measured_in_bytes(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_payload_bytes=2048)
    async with await connected(rg.url) as ws:
        # 800 characters, 2400 bytes in UTF-8
        await send(ws, {"type": "req", "id": "mb", "method": "health", "params": {"p": "\u20ac" * 800}})
        res = await recv_res(ws)
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert res["error"]["details"]["size"] > 2048
        assert await wait_closed(ws) == 1009


async def test_oversized_frame_before_handshake_is_refused_with_1009(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_payload_bytes=2048)
    async with await open_ws(rg.url) as ws:
        await recv(ws)
        await ws.send("x" * 5000)
        res = await recv(ws)
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert await wait_closed(ws) == 1009
    assert rg.gateway.pending_handshakes == 0


async def test_read_scope_cannot_start_runs(gateway: RunningGateway) -> None:
    async with await connected(gateway.url, scopes=[READ]) as ws:
        res = await call(ws, "agent", {"message": "hi", "idempotencyKey": "ro-1"}, "f1")
        assert res["id"] == "f1"
        assert res["ok"] is False
        assert res["error"]["code"] == "FORBIDDEN"
        assert res["error"]["details"] == {
            "code": "MISSING_SCOPE",
            "missingScope": WRITE,
            "requiredScopes": [WRITE],
            "scope": WRITE,
            "method": "agent",
        }
        res = await call(ws, "sessions.spawn", {"sessionKey": "agent:main:main", "task": "t"}, "f2")
        assert res["error"]["code"] == "FORBIDDEN"
        await assert_healthy(ws)
        status = await call(ws, "status", {}, "s1")
        assert status["ok"] is True
    assert gateway.gateway.runs.totals["ok"] == 0
    assert len(gateway.gateway.runs.results) == 0


async def test_scope_is_checked_before_params(gateway: RunningGateway) -> None:
    """A read-only client learns nothing about the params schema of a write method."""
    async with await connected(gateway.url, scopes=[READ]) as ws:
        res = await call(ws, "agent", {"message": 5}, "f3")
        assert res["error"]["code"] == "FORBIDDEN"


async def test_agent_answers_twice_with_the_request_id(gateway: RunningGateway, clock: FakeClock) -> None:
    async with await connected(gateway.url) as ws:
        res = await call(ws, "agent", {"message": "hello", "idempotencyKey": "twice-1"}, "t1")
        assert res["payload"] == {
            "runId": "twice-1",
            "sessionKey": "agent:main:main",
            "agentId": "main",
            "status": "accepted",
            "acceptedAt": int(clock.time() * 1000),
        }
        final = await recv_res(ws)
        assert final["id"] == "t1"
        assert final["payload"]["runId"] == "twice-1"
        assert final["payload"]["status"] == "ok"
        assert final["payload"]["summary"] == "completed"
    await settle(gateway.gateway)


# -- slow consumers --------------------------------------------------------------------------------
async def _run_to_final(
    ws: ClientConnection, req_id: str, message: str, timeout: float = 10.0
) -> dict[str, Any]:
    """Start a run on a raw connection and read (all its events) up to the final answer."""
    await send(
        ws,
        {
            "type": "req",
            "id": req_id,
            "method": "agent",
            "params": {"message": message, "idempotencyKey": req_id},
        },
    )
    answers = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await recv(ws, max(0.01, deadline - loop.time()))
        if frame["type"] == "res" and frame["id"] == req_id:
            assert frame["ok"] is True, frame
            answers += 1
            if answers == 2:
                return frame["payload"]


async def test_slow_consumer_is_disconnected_and_others_are_served(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_buffered_bytes=65536)
    gw = rg.gateway
    # The slow client: a tiny kernel receive buffer, no compression (the scripted filler text
    # compresses a thousandfold), and a reader that stops after the subscription.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", rg.port))
    slow = await websockets.connect(
        rg.url, sock=sock, max_queue=1, compression=None, ping_interval=None, max_size=None, close_timeout=1
    )
    hello = await handshake(slow)
    slow_id = hello["payload"]["server"]["connId"]
    res = await call(slow, "events.subscribe", {"all": True}, "sub")
    assert res["ok"] is True
    assert gw.bus.all_subs == {slow_id}

    # The fast client reads everything, also uncompressed, and gets replies 3x max_buffered_bytes.
    fast = await websockets.connect(rg.url, ping_interval=None, compression=None, max_size=None)
    fast_hello = await handshake(fast)
    fast_id = fast_hello["payload"]["server"]["connId"]
    try:
        runs = 0
        for i in range(80):
            final = await _run_to_final(fast, f"big-{i}", "[[size:200000]]")
            runs += 1
            assert final["status"] == "ok"
            assert len(final["result"]["payloads"][0]["text"]) == 200_000
            if gw.slow_consumers:
                break
        assert gw.slow_consumers == 1, "the slow consumer was never detected"
        await wait_until(lambda: slow_id not in gw.connections)
        assert gw.slow_consumers == 1
        assert list(gw.connections) == [fast_id]
        assert gw.bus.all_subs == set()
        assert set(gw.bus.sinks) == {fast_id}
        # ~800 KB of events per run went to the subscriber; it cannot have taken more than a few.
        assert runs < 40
        # The fast client goes on being served.
        final = await _run_to_final(fast, "after-slow", "[[size:200000]]")
        assert final["status"] == "ok"
        await assert_healthy(fast)
        # The slow client, when it finally reads, finds its connection gone (not a clean close).
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            for _ in range(10_000):
                await asyncio.wait_for(slow.recv(), 5)
        assert slow.close_code != 1000
    finally:
        await fast.close()
        await slow.close()
    await settle(gw)


async def test_fast_reader_of_large_replies_is_not_a_slow_consumer(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_buffered_bytes=65536)
    async with websockets.connect(rg.url, ping_interval=None, compression=None, max_size=None) as ws:
        await handshake(ws)
        for i in range(5):
            final = await _run_to_final(ws, f"fast-{i}", "[[size:300000]] [[chunks:3]]")
            assert len(final["result"]["payloads"][0]["text"]) == 300_000
        await assert_healthy(ws)
    assert rg.gateway.slow_consumers == 0
    await settle(rg.gateway)


def test_send_buffer_bounds() -> None:
    buf = SendBuffer(100, hard_max_bytes=1000)
    # A free writer takes any single frame, even one over the soft bound.
    assert buf.push("x" * 150, writer_blocked=False)
    assert buf.pending_bytes == 150
    # While the writer is stuck and more than max_bytes waits, the consumer is slow.
    assert not buf.push("y", writer_blocked=True)
    assert buf.overflowed
    assert buf.pending_bytes == 0
    assert len(buf) == 0
    assert not buf.push("z", writer_blocked=False)  # overflow is final

    buf = SendBuffer(100, hard_max_bytes=1000)
    assert buf.push("a" * 60, writer_blocked=True)
    assert buf.push("b" * 60, writer_blocked=True)  # 60 waiting <= 100: still accepted
    assert not buf.push("c", writer_blocked=True)  # 120 waiting > 100
    buf = SendBuffer(100, hard_max_bytes=1000)
    for _ in range(9):
        assert buf.push("d" * 100, writer_blocked=False)
    # Even a free writer cannot have more than the hard ceiling queued.
    assert not buf.push("e" * 101, writer_blocked=False)

    buf = SendBuffer(10)
    assert buf.push("\u20ac\u20ac", writer_blocked=False)
    assert buf.pending_bytes == 6  # bytes, not characters
    assert buf.pop() == "\u20ac\u20ac"
    assert buf.pending_bytes == 0
    assert buf.pop() is None


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)
    assert bucket.take(0.1) == 0.0
    assert bucket.take(100.0) == 0.0
    assert bucket.tokens == pytest.approx(2.0)  # refill is capped at the burst


async def test_connections_over_the_limit_get_close_1013(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_connections=1)
    async with await connected(rg.url) as first:
        async with await open_ws(rg.url) as second:
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await asyncio.wait_for(second.recv(), 5)
            assert second.close_code == 1013
            assert second.close_reason == "too many connections"
        await assert_healthy(first)
    await wait_until(lambda: not rg.gateway.connections)
    async with await connected(rg.url) as again:
        await assert_healthy(again)


async def test_pending_handshakes_over_the_limit_get_close_1013(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_pending_handshakes=2)
    idle = [await open_ws(rg.url) for _ in range(2)]
    for ws in idle:
        await recv(ws)
    async with await open_ws(rg.url) as third:
        assert await wait_closed(third) == 1013
        assert third.close_reason == "too many pending handshakes"
    # Finishing a handshake frees a slot.
    await send(idle[0], {"type": "req", "id": "c1", "method": "connect", "params": connect_params()})
    assert (await recv(idle[0]))["ok"] is True
    async with await connected(rg.url) as fourth:
        await assert_healthy(fourth)
    for ws in idle:
        await ws.close()
