"""Security of the front door: browser origins and host names, failed-auth limits, token strength
and files, scope ceilings of named tokens, clipped and rate-limited logs, odd device keys.

Everything talks to a real gateway over real sockets on 127.0.0.1. A peer "on the network" is
simulated the way a reverse proxy on the same host presents one: an X-Forwarded-For header from
loopback, which the server trusts (uvicorn's default), so the peer address is the forwarded one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from clawgate.client import Client, ClientError
from clawgate.errors import Unauthorized
from clawgate.protocol.device import verify_device_signature
from clawgate.server.serve import RunningGateway
from clawgate.settings import Settings, load_settings, parse_settings
from clawgate.state.clock import FakeClock
from clawgate.testing import clean_env
from conftest import GatewayFactory, GatewayProcessFactory

READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"
STRONG = "correct-horse-battery-staple-0123"
CLAWGATE = str(Path(sys.executable).parent / "clawgate")


# -- helpers ---------------------------------------------------------------------------------------
def connect_params(token: str | None = None, scopes: list[str] | None = None, **over: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "minProtocol": 3,
        "maxProtocol": 4,
        "client": {"id": "test", "version": "1", "platform": "linux", "mode": "cli"},
        "role": "operator",
    }
    if scopes is not None:
        params["scopes"] = scopes
    if token is not None:
        params["auth"] = {"token": token}
    params.update(over)
    return params


async def open_ws(url: str, headers: dict[str, str] | None = None, **kw: Any) -> ClientConnection:
    return await websockets.connect(
        url, ping_interval=None, open_timeout=5, close_timeout=2, additional_headers=headers, **kw
    )


async def recv(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert isinstance(frame, dict)
    return frame


async def recv_res(ws: ClientConnection) -> dict[str, Any]:
    while True:
        frame = await recv(ws)
        if frame["type"] == "res":
            return frame


async def try_connect(
    url: str, params: dict[str, Any], headers: dict[str, str] | None = None, **kw: Any
) -> dict[str, Any]:
    """Open a socket, send `connect`, return the answer frame (the socket is closed after)."""
    async with await open_ws(url, headers, **kw) as ws:
        assert (await recv(ws))["event"] == "connect.challenge"
        await ws.send(json.dumps({"type": "req", "id": "c", "method": "connect", "params": params}))
        return await recv_res(ws)


async def raw_upgrade_status(port: int, host: str | None, origin: str | None = None) -> int:
    """Send a WebSocket upgrade with exactly these Host / Origin headers; return the HTTP status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [
        "GET / HTTP/1.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if host is not None:
        lines.append(f"Host: {host}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(status_line.split()[1])


async def status_of(start: GatewayFactory, **settings: Any) -> tuple[RunningGateway, int]:
    rg = await start(**settings)
    return rg, rg.port


# -- 1. origins and hosts --------------------------------------------------------------------------
async def test_websocket_from_a_foreign_page_is_refused_with_403_before_the_upgrade(
    gateway: RunningGateway,
) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        await open_ws(gateway.url, origin="http://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    assert b"origin not allowed" in refused.value.response.body
    # No connection was ever adopted: the refusal happened before the endpoint ran.
    assert gateway.gateway.registry.sizes()["connections"] == 0
    for origin in ("null", "http://127.0.0.1.evil.example", f"https://127.0.0.1:{gateway.port}"):
        assert await raw_upgrade_status(gateway.port, f"127.0.0.1:{gateway.port}", origin) == 403, origin


async def test_clients_without_origin_the_own_origin_and_allowed_origins_connect(
    start_gateway: GatewayFactory,
) -> None:
    rg = await start_gateway(allowed_origins=["https://app.example:8443"])
    hello = await try_connect(rg.url, connect_params(scopes=[READ]))  # a CLI: no Origin at all
    assert hello["ok"] is True
    own = f"http://127.0.0.1:{rg.port}"
    for origin in (own, "https://app.example:8443", "HTTPS://APP.EXAMPLE:8443/"):
        res = await try_connect(rg.url, connect_params(scopes=[READ]), origin=origin)
        assert res["ok"] is True, origin
    assert await raw_upgrade_status(rg.port, f"127.0.0.1:{rg.port}", "https://app.example") == 403


async def test_rebound_host_names_are_refused_and_loopback_names_accepted(
    start_gateway: GatewayFactory,
) -> None:
    rg = await start_gateway(allowed_hosts=["gateway.lan"])
    port = rg.port
    assert await raw_upgrade_status(port, "attacker.example") == 403
    assert await raw_upgrade_status(port, f"attacker.example:{port}") == 403
    # A rebound page is same-origin with itself: its Origin matching its Host does not help it.
    assert (
        await raw_upgrade_status(port, f"attacker.example:{port}", f"http://attacker.example:{port}") == 403
    )
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "gateway.lan:80"):
        assert await raw_upgrade_status(port, host) == 101, host


async def test_http_endpoints_apply_the_same_checks(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        for path in ("/metrics", "/readyz", "/healthz"):
            assert (await http.get(path)).status_code == 200, path
            foreign = await http.get(path, headers={"Origin": "http://evil.example"})
            assert foreign.status_code == 403, path
            assert foreign.json()["error"]["code"] == "FORBIDDEN"
            rebound = await http.get(path, headers={"Host": "attacker.example"})
            assert rebound.status_code == 403, path


def test_origin_and_host_rules() -> None:
    from clawgate.server.origin import host_allowed, normalize_origin, origin_allowed

    s = parse_settings(allowed_origins=["https://ui.example"], allowed_hosts=["gw.example"])
    assert normalize_origin("https://UI.example/") == "https://ui.example:443"
    assert normalize_origin("null") is None
    assert normalize_origin("file:///etc/passwd") is None
    assert origin_allowed("https://ui.example:443", "x", "ws", s)
    assert not origin_allowed("http://ui.example", "x", "ws", s)
    assert origin_allowed("https://gw.example:9", "gw.example:9", "wss", s)  # own origin, TLS
    assert not origin_allowed("http://gw.example:9", "gw.example:9", "wss", s)
    assert host_allowed("127.0.0.5:1", s) and host_allowed("foo.localhost", s)
    assert host_allowed("gw.example.", s) and host_allowed(None, s)
    assert not host_allowed("10.0.0.1", s)  # loopback bind: other addresses are not the gateway
    wildcard = parse_settings(bind="0.0.0.0", token=STRONG)
    assert host_allowed("10.0.0.1:18789", wildcard) and host_allowed("[fe80::1]:1", wildcard)
    assert not host_allowed("gw.example", wildcard)


# -- 2. failed-auth limit, token strength, token files ----------------------------------------------
async def test_failed_auth_from_a_network_peer_locks_it_out_then_the_clock_frees_it(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(token=STRONG)
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    for i in range(10):
        res = await try_connect(rg.url, connect_params(f"wrong-guess-{i}", [READ]), attacker)
        assert res["error"]["code"] == "UNAUTHORIZED", i
    # The 11th try is refused before the token is even looked at: the right one does not help.
    locked = await try_connect(rg.url, connect_params(STRONG, [READ]), attacker)
    assert locked["error"]["code"] == "UNAVAILABLE"
    assert locked["error"]["retryable"] is True
    assert 299_000 <= locked["error"]["retryAfterMs"] <= 300_001
    # Another address is not affected, and neither is a local CLI.
    other = await try_connect(rg.url, connect_params(STRONG, [READ]), {"X-Forwarded-For": "203.0.113.8"})
    assert other["ok"] is True
    assert (await try_connect(rg.url, connect_params(STRONG, [READ])))["ok"] is True
    gw = rg.gateway
    assert gw.registry.sizes()["auth_failures"] == 1
    await clock.advance_async(299)
    still = await try_connect(rg.url, connect_params(STRONG, [READ]), attacker)
    assert still["error"]["code"] == "UNAVAILABLE"
    await clock.advance_async(2)
    assert (await try_connect(rg.url, connect_params(STRONG, [READ]), attacker))["ok"] is True
    # The per-address state is a bounded, swept structure: maintenance empties it.
    await try_connect(rg.url, connect_params("wrong", [READ]), attacker)
    assert gw.registry.sizes()["auth_failures"] == 1
    await clock.advance_async(61)
    await gw.maintenance.run_once()
    assert gw.registry.sizes()["auth_failures"] == 0


async def test_failures_spread_over_more_than_the_window_do_not_lock(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(token=STRONG, auth_rate_limit_max_attempts=3)
    peer = {"X-Forwarded-For": "198.51.100.4"}
    for _ in range(4):
        res = await try_connect(rg.url, connect_params("nope", [READ]), peer)
        assert res["error"]["code"] == "UNAUTHORIZED"
        await clock.advance_async(31)  # never three failures within 60 s
    assert (await try_connect(rg.url, connect_params(STRONG, [READ]), peer))["ok"] is True


async def test_loopback_is_exempt_but_not_a_browser_page_on_loopback(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(token=STRONG, allowed_origins=["http://ui.example"])
    for _ in range(15):
        res = await try_connect(rg.url, connect_params("nope", [READ]))
        assert res["error"]["code"] == "UNAUTHORIZED"
    assert (await try_connect(rg.url, connect_params(STRONG, [READ])))["ok"] is True
    for _ in range(10):
        res = await try_connect(rg.url, connect_params("nope", [READ]), origin="http://ui.example")
        assert res["error"]["code"] == "UNAUTHORIZED"
    page = await try_connect(rg.url, connect_params(STRONG, [READ]), origin="http://ui.example")
    assert page["error"]["code"] == "UNAVAILABLE"
    assert (await try_connect(rg.url, connect_params(STRONG, [READ])))["ok"] is True  # the CLI still works


def test_auth_failure_state_is_bounded_in_peers(tmp_path: Path) -> None:
    from clawgate.server.authlimit import AuthFailureLimiter, peer_key
    from clawgate.state.registry import StateRegistry

    registry = StateRegistry()
    limiter = AuthFailureLimiter(
        FakeClock(), registry, max_attempts=10, window_s=60, lockout_s=300, max_peers=100
    )
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert registry.sizes()["auth_failures"] == 100
    # IPv6 peers are limited per /64: one host can hold billions of addresses.
    assert peer_key("2001:db8::1") == peer_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert peer_key("::ffff:203.0.113.9") == "203.0.113.9"


@pytest.mark.parametrize(
    ("token", "message"),
    [("short-token", "shorter than 16"), (" " * 20, "only whitespace"), ("\t\n  \t" * 5, "only whitespace")],
)
def test_a_non_loopback_bind_refuses_a_weak_token(tmp_path: Path, token: str, message: str) -> None:
    from clawgate.server.credentials import exposure_problems, load_credentials

    settings = parse_settings(bind="0.0.0.0", token=token)
    problems = exposure_problems(settings, load_credentials(settings))
    assert problems and message in problems[0]
    res = subprocess.run(
        [CLAWGATE, "gateway", "--bind", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(CLAWGATE_TOKEN=token),
        check=False,
    )
    assert res.returncode == 2
    assert message in " ".join(res.stderr.split())
    # On loopback a short token is the user's business; off loopback a strong one is fine.
    assert (
        exposure_problems(parse_settings(token="short"), load_credentials(parse_settings(token="short")))
        == []
    )
    strong = parse_settings(bind="0.0.0.0", token=STRONG)
    assert exposure_problems(strong, load_credentials(strong)) == []


async def test_weak_named_token_refuses_to_serve_off_loopback(tmp_path: Path) -> None:
    from clawgate.server.gateway import Gateway

    settings = parse_settings(
        bind="0.0.0.0", port=0, state_dir=tmp_path / "s", token=STRONG, tokens={"ro": {"token": "tiny"}}
    )
    with pytest.raises(RuntimeError, match="token 'ro' is shorter than 16"):
        async with RunningGateway(Gateway(settings)):
            pass


def test_token_on_the_command_line_warns_and_token_file_does_not(tmp_path: Path) -> None:
    res = subprocess.run(
        [CLAWGATE, "gateway", "--token", STRONG, "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert res.returncode == 0
    assert "visible to every local user" in res.stderr
    assert STRONG not in res.stdout + res.stderr
    token_file = tmp_path / "gw.token"
    token_file.write_text(STRONG + "\n")
    token_file.chmod(0o644)
    res = subprocess.run(
        [CLAWGATE, "gateway", "--token-file", str(token_file), "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert "readable by other users" in res.stderr
    token_file.chmod(0o600)
    res = subprocess.run(
        [CLAWGATE, "gateway", "--token-file", str(token_file), "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "visible" not in res.stderr
    assert json.loads(res.stdout)["token_file"] == str(token_file)
    empty = tmp_path / "empty.token"
    empty.write_text("\n  \n")
    res = subprocess.run(
        [CLAWGATE, "gateway", "--token-file", str(empty), "--port", "0", "--state-dir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert res.returncode == 2
    assert "is empty" in res.stderr


async def test_token_file_is_the_gateway_token(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "gw.token"
    token_file.write_text(f"  {STRONG}\n")
    rg = await start_gateway(token_file=str(token_file))
    assert (await try_connect(rg.url, connect_params(STRONG, [ADMIN])))["ok"] is True
    assert (await try_connect(rg.url, connect_params(None, [READ])))["error"]["code"] == "UNAUTHORIZED"
    assert (await try_connect(rg.url, connect_params("x" + STRONG, [READ])))["error"][
        "code"
    ] == "UNAUTHORIZED"


# -- 3. scopes: read by default, ceilings per named token ------------------------------------------
async def test_omitted_scopes_grant_read_only(gateway: RunningGateway) -> None:
    async with await open_ws(gateway.url) as ws:
        await recv(ws)
        await ws.send(json.dumps({"type": "req", "id": "c", "method": "connect", "params": connect_params()}))
        hello = await recv_res(ws)
        assert hello["payload"]["auth"]["scopes"] == [READ]
        await ws.send(json.dumps({"type": "req", "id": "s", "method": "status", "params": {}}))
        assert (await recv_res(ws))["ok"] is True
        agent = {"message": "hi", "idempotencyKey": "no-scope-run"}
        await ws.send(json.dumps({"type": "req", "id": "a", "method": "agent", "params": agent}))
        res = await recv_res(ws)
        assert res["error"]["code"] == "FORBIDDEN"
        assert res["error"]["details"]["code"] == "MISSING_SCOPE"
        assert res["error"]["details"]["missingScope"] == WRITE


async def test_named_tokens_cap_the_scopes_a_connection_may_ask_for(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    ci_file = tmp_path / "ci.token"
    ci_file.write_text("ci-" + STRONG + "\n")
    rg = await start_gateway(
        token=STRONG,
        tokens={
            "viewer": {"token": "viewer-" + STRONG},  # no scopes given: read only
            "ci": {"token_file": str(ci_file), "scopes": [READ, WRITE]},
        },
    )
    viewer, ci = "viewer-" + STRONG, "ci-" + STRONG
    ok = await try_connect(rg.url, connect_params(viewer, [READ]))
    assert ok["payload"]["auth"] == {"method": "token", "role": "operator", "scopes": [READ]}
    for token, asked, missing in (
        (viewer, [READ, WRITE], WRITE),
        (viewer, [ADMIN], ADMIN),
        (ci, [ADMIN], ADMIN),
    ):
        res = await try_connect(rg.url, connect_params(token, asked))
        assert res["ok"] is False
        assert res["error"]["code"] == "FORBIDDEN"
        details = res["error"]["details"]
        assert details["code"] == "MISSING_SCOPE"
        assert details["missingScope"] == missing
        assert details["requiredScopes"] == [missing]
    granted = await try_connect(rg.url, connect_params(ci, [WRITE]))
    assert granted["payload"]["auth"]["scopes"] == [READ, WRITE]
    admin = await try_connect(rg.url, connect_params(STRONG, [ADMIN]))
    assert admin["payload"]["auth"]["scopes"] == [ADMIN, READ, WRITE]
    # A read-only credential reads, and cannot write, through the clawgate client too.
    async with Client(rg.url, token=viewer, scopes=[READ], max_reconnect_attempts=0) as c:
        assert (await c.call("status"))["version"]
        with pytest.raises(ClientError) as refused:
            await c.run_agent("hi", idempotency_key="viewer-run")
        assert refused.value.code == "FORBIDDEN"
    with pytest.raises(ClientError) as too_much:
        async with Client(rg.url, token=viewer, max_reconnect_attempts=0):  # default asks read+write
            pass
    assert too_much.value.code == "FORBIDDEN"
    assert too_much.value.details["missingScope"] == WRITE


def test_named_tokens_from_toml(tmp_path: Path) -> None:
    from clawgate.server.credentials import Credentials, load_credentials

    (tmp_path / "ci.token").write_text("ci-" + STRONG)
    config = tmp_path / "clawgate.toml"
    config.write_text(
        f'token = "{STRONG}"\n'
        f'tokens = {{ ci = {{ token_file = "{tmp_path / "ci.token"}", scopes = ["operator.read", '
        '"operator.write"] }, ro = { token = "ro-0123456789abcdef" } }\n'
    )
    settings = load_settings(config)
    creds = load_credentials(settings)
    assert {c.name: sorted(c.ceiling) for c in creds.entries} == {
        "default": [ADMIN, READ, WRITE],
        "ci": [READ, WRITE],
        "ro": [READ],
    }
    assert creds.match("ci-" + STRONG) is not None and creds.match("ci-") is None
    assert settings.redacted()["tokens"]["ro"]["token"] == "***"
    with pytest.raises(ValueError, match="same"):
        load_credentials(parse_settings(token=STRONG, tokens={"dup": {"token": STRONG}}))
    with pytest.raises(ValueError, match="unknown scopes"):
        parse_settings(tokens={"x": {"token": STRONG, "scopes": ["operator.root"]}})
    assert Credentials().required is False


async def test_cli_asks_for_the_scope_of_the_method_it_calls(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """`status` and read methods work with a read-only token; `agent` asks for write."""
    viewer = "viewer-" + STRONG
    rg = await start_gateway(token=STRONG, tokens={"viewer": {"token": viewer}})
    token_file = tmp_path / "viewer.token"
    token_file.write_text(viewer)

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            CLAWGATE,
            *args,
            "--url",
            rg.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(CLAWGATE_TOKEN=viewer),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await cli("status", "--json")
    assert code == 0, err
    assert json.loads(out)["version"]
    assert "visible" not in err  # the token came from the environment
    code, out, err = await cli("call", "sessions.list")
    assert code == 0, err
    code, out, err = await cli("call", "agent", "--params", '{"message": "hi"}')
    assert code == 1
    assert json.loads(err)["error"]["details"]["missingScope"] == WRITE
    code, out, err = await cli("call", "health", "--token-file", str(token_file))
    assert code == 0, err
    code, out, err = await cli("call", "health", "--token", viewer)
    assert code == 0, err
    assert "visible to every local user" in " ".join(err.split())


# -- 7. client strings in logs and errors ---------------------------------------------------------
def test_clip_bounds_any_client_string() -> None:
    from clawgate.clip import clip

    assert clip("short") == "short"
    long = clip("m" * 512 * 1024)
    assert len(long) < 100 and long.endswith(f"(+{512 * 1024 - 64} chars)")
    assert len(clip(["operator.x" * 1000])) < 100


async def test_errors_echo_only_a_clipped_method(gateway: RunningGateway) -> None:
    huge = "m" * 200_000
    async with await open_ws(gateway.url, max_size=2**22) as ws:
        await recv(ws)
        await ws.send(json.dumps({"type": "req", "id": "c", "method": huge, "params": {}}))
        res = await recv_res(ws)
        assert res["error"]["code"] == "INVALID_REQUEST"
        assert len(json.dumps(res)) < 1024
    async with Client(gateway.url, max_reconnect_attempts=0) as c:
        with pytest.raises(ClientError) as unknown:
            await c.call(huge)
        assert unknown.value.code == "INVALID_REQUEST"
        assert len(unknown.value.message) < 200
        assert len(unknown.value.details["method"]) < 100
        long_id = "r" * 256  # the longest run id or session key the schema lets through
        with pytest.raises(ClientError) as missing:
            await c.wait(long_id, timeout_ms=0)
        assert missing.value.code == "NOT_FOUND" and len(missing.value.message) < 120
        with pytest.raises(ClientError) as no_session:
            await c.call("sessions.reset", {"key": "agent:main:" + "k" * 190})
        assert no_session.value.code == "NOT_FOUND" and len(no_session.value.message) < 120
    res = await try_connect(gateway.url, connect_params(scopes=[READ], role="r" * 100_000))
    assert res["error"]["code"] == "INVALID_REQUEST" and len(res["error"]["message"]) < 200
    res = await try_connect(gateway.url, connect_params(scopes=["x" * 100_000]))
    assert res["error"]["code"] == "INVALID_REQUEST" and len(res["error"]["message"]) < 200


async def test_refused_handshakes_cannot_flood_the_log(gateway_process: GatewayProcessFactory) -> None:
    """20 refused handshakes with a 400 KB method once wrote megabytes of log at info level."""
    # Its log goes to a file, not a pipe: a gateway flooding an unread pipe would block instead of failing.
    gp = await gateway_process(settings={"shutdown_grace_s": 1}).astart()
    huge = "x" * (400 * 1024)
    for _ in range(20):
        async with await open_ws(gp.url) as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "req", "id": "c", "method": huge, "params": {}}))
            await recv_res(ws)
    _rc, text = await gp.astop()
    refused = [line for line in text.splitlines() if "handshake refused" in line]
    assert 1 <= len(refused) <= 5  # log_repeat_max lines per peer and window
    assert all(len(line) < 600 for line in refused)
    assert len(text) < 16 * 1024


async def test_repeated_lines_per_peer_are_dropped_and_counted(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(log_repeat_max=3)
    peer_log = rg.gateway.peer_log
    for _ in range(10):
        await try_connect(rg.url, connect_params(scopes=[READ], role="bogus"))
    assert peer_log.suppressed_total == 7
    assert rg.gateway.registry.sizes()["peer_log_windows"] == 1
    assert not peer_log.allow("127.0.0.1", "handshake refused")
    assert peer_log.allow("192.0.2.1", "handshake refused")  # another peer has its own budget


# -- 10. device keys of unknown algorithms ----------------------------------------------------------
def _unknown_algorithm_pem() -> str:
    # SubjectPublicKeyInfo with algorithm OID 1.2.3.4 and a 32-byte key.
    oid = bytes([0x06, 0x03, 0x2A, 0x03, 0x04])
    algorithm = bytes([0x30, len(oid)]) + oid
    body = algorithm + bytes([0x03, 33, 0]) + bytes(32)
    der = bytes([0x30, len(body)]) + body
    return "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode() + "\n-----END PUBLIC KEY-----\n"


def _device(public_key: str, nonce: str) -> dict[str, Any]:
    return {"id": "0" * 64, "publicKey": public_key, "signature": "AAAA", "signedAt": 1, "nonce": nonce}


def test_unknown_key_algorithm_is_unauthorized_in_the_pure_check() -> None:
    with pytest.raises(Unauthorized) as refused:
        verify_device_signature(
            _device(_unknown_algorithm_pem(), "n"),
            client_id="c",
            client_mode="cli",
            role="operator",
            scopes=[READ],
            token=None,
            nonce="n",
            now_ms=1,
        )
    assert refused.value.details == {"code": "DEVICE_AUTH_DEVICE_ID_MISMATCH", "reason": "device-id-mismatch"}


async def test_unknown_key_algorithm_is_unauthorized_on_the_wire(gateway: RunningGateway) -> None:
    errors_before = gateway.gateway.internal_errors
    async with await open_ws(gateway.url) as ws:
        nonce = (await recv(ws))["payload"]["nonce"]
        params = connect_params(scopes=[READ], device=_device(_unknown_algorithm_pem(), nonce))
        await ws.send(json.dumps({"type": "req", "id": "c", "method": "connect", "params": params}))
        res = await recv_res(ws)
    assert res["error"]["code"] == "UNAUTHORIZED"
    assert res["error"]["details"]["code"] == "DEVICE_AUTH_DEVICE_ID_MISMATCH"
    assert gateway.gateway.internal_errors == errors_before


async def test_guard_refuses_with_a_close_when_the_server_has_no_http_response_extension() -> None:
    """Servers without the ASGI `websocket.http.response` extension answer a close-before-accept with 403."""
    from clawgate.server.origin import OriginHostGuard

    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["type"])

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    refused: list[tuple[str, str]] = []
    guard = OriginHostGuard(app, Settings(), on_refused=lambda peer, why: refused.append((peer, why)))
    scope = {
        "type": "websocket",
        "scheme": "ws",
        "path": "/",
        "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"127.0.0.1:18789"), (b"origin", b"http://evil.example")],
    }
    await guard(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert reached == []
    assert refused == [("127.0.0.1", "origin not allowed: http://evil.example (see allowed_origins)")]
    await guard({**scope, "headers": [(b"host", b"127.0.0.1:18789")]}, receive, send)
    assert reached == ["websocket"]
