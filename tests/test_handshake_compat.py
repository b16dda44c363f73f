"""OpenClaw client compatibility over a raw WebSocket: handshake, device identity, `agent`, `chat`.

The frames here are the ones OpenClaw's clients send (docs/openclaw-wire-notes.md,
captured from the 2026.9.6 CLI), written by hand with a bare `websockets` client
so nothing of clawgate's own client library smooths over a difference. The
gateway runs in-process on 127.0.0.1 with the test's FakeClock, so the
`connect.challenge` `ts` (which OpenClaw clients sign as `signedAt`) is exact.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from clawgate.protocol.constants import CLOSE_POLICY
from clawgate.protocol.device import DEVICE_SIGNATURE_SKEW_MS, b64url_encode, build_device_payload_v3
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle

TOKEN = "s3cret-token"
FRAME_TIMEOUT_S = 10.0

# The methods OpenClaw clients (CLI, chat UIs) rely on; all must be advertised in hello-ok.
OPENCLAW_CORE_METHODS = {
    "health",
    "status",
    "agent",
    "agent.wait",
    "chat.send",
    "chat.history",
    "chat.abort",
    "sessions.list",
}
# Keys OpenClaw's HelloOkSchema allows (every object in it is closed).
HELLO_KEYS = {
    "type",
    "protocol",
    "server",
    "features",
    "snapshot",
    "auth",
    "policy",
    "controlUiUrl",
    "controlUiTabs",
    "controlUiWidgetKinds",
    "controlUiLinkReaders",
    "pluginSurfaceUrls",
}
HELLO_SERVER_KEYS = {"version", "connId", "buildId", "bootId", "controlUiBuildSource"}

READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"


def cli_client() -> dict[str, Any]:
    """`client` exactly as the OpenClaw 2026.9.6 CLI sends it."""
    return {
        "id": "cli",
        "version": "2026.9.6",
        "platform": "linux",
        "deviceFamily": "Linux",
        "mode": "cli",
        "instanceId": str(uuid.uuid4()),
    }


def cli_connect_params(*, token: str | None = TOKEN, scopes: list[str] | None = None) -> dict[str, Any]:
    """The connect params of `openclaw gateway call health --url ws://127.0.0.1:P/ --token T`."""
    params: dict[str, Any] = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": cli_client(),
        "caps": [],
        "auth": {"token": token},
        "role": "operator",
        "scopes": scopes if scopes is not None else [READ],
    }
    if token is None:
        del params["auth"]
    return params


def req_id(n: int) -> str:
    """OpenClaw request ids look like `<n>:<uuid>`."""
    return f"{n}:{uuid.uuid4()}"


class Raw:
    """A bare websockets client: frames in, frames out, events kept in arrival order."""

    def __init__(self, ws: websockets.ClientConnection, challenge: dict[str, Any]) -> None:
        self.ws = ws
        self.challenge = challenge
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, url: str) -> Raw:
        ws = await websockets.connect(url, ping_interval=None)
        challenge = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S))
        assert challenge["type"] == "event" and challenge["event"] == "connect.challenge", challenge
        return cls(ws, challenge)

    @property
    def nonce(self) -> str:
        nonce: str = self.challenge["payload"]["nonce"]
        return nonce

    @property
    def challenge_ts(self) -> int:
        ts: int = self.challenge["payload"]["ts"]
        return ts

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), FRAME_TIMEOUT_S))
        return frame

    async def request(self, method: str, params: dict[str, Any], rid: str | None = None) -> str:
        rid = rid or req_id(2)
        await self.send({"type": "req", "id": rid, "method": method, "params": params})
        return rid

    async def response(self, rid: str) -> dict[str, Any]:
        """The next `res` for `rid`; events that arrive first are kept in `self.events`."""
        while True:
            frame = await self.recv()
            if frame["type"] == "event":
                self.events.append(frame)
                continue
            assert frame["type"] == "res" and frame["id"] == rid, frame
            return frame

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return await self.response(await self.request(method, params))

    async def connect(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self.call("connect", params)

    async def event(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event (already received or next to come) matching `pred`."""
        for frame in self.events:
            if pred(frame):
                return frame
        while True:
            frame = await self.recv()
            assert frame["type"] == "event", f"unexpected frame while waiting for an event: {frame}"
            self.events.append(frame)
            if pred(frame):
                return frame

    async def close_code(self) -> int | None:
        """Wait for the server to close the socket; its close code."""
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await asyncio.wait_for(self.ws.recv(), FRAME_TIMEOUT_S)
        return info.value.rcvd.code if info.value.rcvd is not None else None

    async def close(self) -> None:
        await self.ws.close()

    def chat(self, run_id: str) -> list[dict[str, Any]]:
        return [f["payload"] for f in self.events if f["event"] == "chat" and f["payload"]["runId"] == run_id]

    def agent(self, run_id: str) -> list[dict[str, Any]]:
        return [
            f["payload"] for f in self.events if f["event"] == "agent" and f["payload"]["runId"] == run_id
        ]


async def connected(url: str, scopes: list[str] | None = None) -> Raw:
    raw = await Raw.open(url)
    hello = await raw.connect(cli_connect_params(scopes=scopes or [READ, WRITE]))
    assert hello["ok"] is True, hello
    return raw


def is_chat(run_id: str, state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: (
        f["event"] == "chat" and f["payload"]["runId"] == run_id and f["payload"]["state"] == state
    )


def is_lifecycle(run_id: str, phase: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: (
        f["event"] == "agent"
        and f["payload"]["runId"] == run_id
        and f["payload"]["stream"] == "lifecycle"
        and f["payload"]["data"]["phase"] == phase
    )


# -- device identity, signed the way OpenClaw clients sign it --------------------------------------
class DeviceKey:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key = b64url_encode(raw)
        self.device_id = hashlib.sha256(raw).hexdigest()

    def block(
        self,
        *,
        nonce: str,
        signed_at: int,
        scopes: list[str],
        token: str | None,
        client: dict[str, Any],
        role: str = "operator",
        signed_nonce: str | None = None,
    ) -> dict[str, Any]:
        """The connect `device` block; `signed_nonce` signs another nonce than the one sent."""
        payload = build_device_payload_v3(
            device_id=self.device_id,
            client_id=client["id"],
            client_mode=client["mode"],
            role=role,
            scopes=scopes,
            signed_at_ms=signed_at,
            token=token,
            nonce=signed_nonce or nonce,
            platform=client.get("platform"),
            device_family=client.get("deviceFamily"),
        )
        return {
            "id": self.device_id,
            "publicKey": self.public_key,
            "signature": b64url_encode(self.key.sign(payload.encode("utf-8"))),
            "signedAt": signed_at,
            "nonce": nonce,
        }


def with_device(raw: Raw, key: DeviceKey, **overrides: Any) -> dict[str, Any]:
    """CLI connect params plus a device block signed over them (signedAt = challenge ts, as OpenClaw)."""
    token = overrides.pop("token", TOKEN)
    params = cli_connect_params(token=token, scopes=overrides.pop("scopes", [READ, WRITE]))
    sign = {
        "nonce": raw.nonce,
        "signed_at": raw.challenge_ts,
        "scopes": params["scopes"],
        "token": token,
        "client": params["client"],
    }
    sign.update(overrides)
    params["device"] = key.block(**sign)
    return params


@pytest.fixture
async def gw(start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway(token=TOKEN)


# == handshake ===================================================================================
async def test_exact_openclaw_cli_connect_frame_gets_hello_ok_v4(
    gw: RunningGateway, clock: FakeClock
) -> None:
    raw = await Raw.open(gw.url)
    try:
        # The CLI signs `signedAt` with the challenge ts, so it must be the gateway's ms clock.
        assert raw.challenge["payload"]["ts"] == int(clock.time() * 1000)
        assert len(raw.nonce) >= 16
        rid = req_id(1)
        res = await raw.response(await raw.request("connect", cli_connect_params(), rid))
        assert res["id"] == rid and res["ok"] is True, res
        hello = res["payload"]
        assert hello["type"] == "hello-ok"
        assert hello["protocol"] == 4
        # No device block was sent: a valid token is enough.
        assert hello["auth"] == {"method": "token", "role": "operator", "scopes": [READ]}
        assert set(hello) <= HELLO_KEYS, set(hello) - HELLO_KEYS
        assert set(hello["server"]) <= HELLO_SERVER_KEYS, hello["server"]
        assert hello["server"]["version"] and hello["server"]["connId"]
        assert set(hello["features"]["methods"]) == set(gw.gateway.methods)
        assert set(hello["features"]["methods"]) >= OPENCLAW_CORE_METHODS
        assert {"agent", "chat", "tick", "shutdown"} <= set(hello["features"]["events"])
        assert hello["policy"] == {"maxPayload": 524288, "maxBufferedBytes": 1572864, "tickIntervalMs": 30000}
        snapshot = hello["snapshot"]
        assert snapshot["sessionDefaults"]["mainSessionKey"] == "agent:main:main"
        assert snapshot["authMode"] == "token"
        assert snapshot["stateVersion"] == {"presence": 0, "health": 0}

        health = await raw.call("health", {})
        assert health["ok"] is True
        assert health["payload"]["ok"] is True
        assert health["payload"]["ts"] == int(clock.time() * 1000)
    finally:
        await raw.close()


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [(3, 4, 4), (4, 4, 4), (3, 3, 3), (1, 3, 3), (4, 9, 4), (2, 3, 3)],
)
async def test_protocol_negotiation_picks_highest_common_version(
    gw: RunningGateway, lo: int, hi: int, expected: int
) -> None:
    raw = await Raw.open(gw.url)
    try:
        params = cli_connect_params()
        params.update(minProtocol=lo, maxProtocol=hi)
        res = await raw.connect(params)
        assert res["ok"] is True, res
        assert res["payload"]["protocol"] == expected
    finally:
        await raw.close()


@pytest.mark.parametrize(("lo", "hi"), [(5, 6), (1, 2), (4, 3)])
async def test_no_common_protocol_is_invalid_request_and_close_1008(
    gw: RunningGateway, lo: int, hi: int
) -> None:
    raw = await Raw.open(gw.url)
    params = cli_connect_params()
    params.update(minProtocol=lo, maxProtocol=hi)
    res = await raw.connect(params)
    assert res["ok"] is False
    assert res["error"]["code"] == "INVALID_REQUEST"
    assert res["error"]["message"]
    assert await raw.close_code() == CLOSE_POLICY


async def test_extra_openclaw_connect_fields_are_accepted(gw: RunningGateway) -> None:
    raw = await Raw.open(gw.url)
    try:
        params = cli_connect_params(scopes=[WRITE])
        params["client"].update(
            displayName="ops laptop", buildId="eb377ac", modelIdentifier="X1", timeZone="Europe/Paris"
        )
        params.update(
            caps=["tool-events", "thinking"],
            commands=["system.run"],
            permissions={"camera": False},
            pathEnv="/usr/bin",
            locale="fr-FR",
            userAgent="openclaw-cli/2026.9.6",
            modelCatalog={"agentId": "main"},
            computerUse={"enabled": False},
        )
        params["auth"].update(approvalRuntimeToken="", agentRuntimeIdentityToken="")
        res = await raw.connect(params)
        assert res["ok"] is True, res
        assert res["payload"]["auth"]["scopes"] == [READ, WRITE]
    finally:
        await raw.close()


@pytest.mark.parametrize(
    ("asked", "granted"),
    [
        ([READ], [READ]),
        ([WRITE], [READ, WRITE]),
        ([ADMIN], [ADMIN, READ, WRITE]),
        ([READ, ADMIN], [ADMIN, READ, WRITE]),
    ],
)
async def test_scopes_admin_implies_write_implies_read(
    gw: RunningGateway, asked: list[str], granted: list[str]
) -> None:
    raw = await Raw.open(gw.url)
    try:
        res = await raw.connect(cli_connect_params(scopes=asked))
        assert res["payload"]["auth"]["scopes"] == granted
        assert (await raw.call("health", {}))["ok"] is True  # read is always implied
        agent = await raw.call("agent", {"message": "hi", "idempotencyKey": f"scope-{uuid.uuid4()}"})
        if WRITE in granted:
            assert agent["ok"] is True and agent["payload"]["status"] == "accepted", agent
        else:
            assert agent["ok"] is False
            assert agent["error"]["code"] == "FORBIDDEN"
            assert agent["error"]["details"] == {
                "code": "MISSING_SCOPE",
                "missingScope": WRITE,
                "requiredScopes": [WRITE],
                "scope": WRITE,
                "method": "agent",
            }
    finally:
        await raw.close()
    await settle(gw.gateway)


@pytest.mark.parametrize(("token", "message"), [(None, "requires a token"), ("wrong", "invalid token")])
async def test_missing_or_wrong_token_is_unauthorized_and_close_1008(
    gw: RunningGateway, token: str | None, message: str
) -> None:
    raw = await Raw.open(gw.url)
    res = await raw.connect(cli_connect_params(token=token))
    assert res["ok"] is False
    assert res["error"]["code"] == "UNAUTHORIZED"
    assert message in res["error"]["message"]
    assert await raw.close_code() == CLOSE_POLICY
    assert gw.gateway.pending_handshakes == 0


# == device identity ==============================================================================
async def test_device_signed_like_openclaw_is_accepted(gw: RunningGateway) -> None:
    raw = await Raw.open(gw.url)
    try:
        res = await raw.connect(with_device(raw, DeviceKey()))
        assert res["ok"] is True, res
        assert res["payload"]["auth"] == {"method": "token", "role": "operator", "scopes": [READ, WRITE]}
        assert (await raw.call("health", {}))["payload"]["ok"] is True
    finally:
        await raw.close()


async def test_device_without_token_on_tokenless_gateway(start_gateway: GatewayFactory) -> None:
    """What `openclaw agent` sends to a gateway in auth mode none: admin scope, a device, no `auth`."""
    gw = await start_gateway()
    raw = await Raw.open(gw.url)
    try:
        params = with_device(raw, DeviceKey(), token=None, scopes=[ADMIN])
        assert "auth" not in params
        res = await raw.connect(params)
        assert res["ok"] is True, res
        assert res["payload"]["auth"] == {
            "method": "none",
            "role": "operator",
            "scopes": [ADMIN, READ, WRITE],
        }
        assert res["payload"]["snapshot"]["authMode"] == "none"
    finally:
        await raw.close()


def _flip_signature(params: dict[str, Any]) -> None:
    sig = bytearray(base64.urlsafe_b64decode(params["device"]["signature"] + "=="))
    sig[10] ^= 0x01
    params["device"]["signature"] = b64url_encode(bytes(sig))


def _other_key(params: dict[str, Any]) -> None:
    params["device"]["publicKey"] = DeviceKey().public_key


@pytest.mark.parametrize(
    ("case", "sign", "mutate", "detail"),
    [
        ("tampered signature", {}, _flip_signature, "DEVICE_AUTH_SIGNATURE_INVALID"),
        ("signed other scopes", {"scopes": [ADMIN]}, None, "DEVICE_AUTH_SIGNATURE_INVALID"),
        ("signed other token", {"token": "not-the-token"}, None, "DEVICE_AUTH_SIGNATURE_INVALID"),
        ("other challenge nonce", {"nonce": "not-this-challenge"}, None, "DEVICE_AUTH_NONCE_MISMATCH"),
        ("nonce sent, another signed", {"signed_nonce": "x"}, None, "DEVICE_AUTH_SIGNATURE_INVALID"),
        ("id of another key", {}, _other_key, "DEVICE_AUTH_DEVICE_ID_MISMATCH"),
    ],
)
async def test_bad_device_proof_is_unauthorized_with_openclaw_detail_code(
    gw: RunningGateway,
    case: str,
    sign: dict[str, Any],
    mutate: Callable[[dict[str, Any]], None] | None,
    detail: str,
) -> None:
    raw = await Raw.open(gw.url)
    params = with_device(raw, DeviceKey(), **sign)
    # The request itself is what the CLI would send: signed scopes/token differ only inside the proof.
    params["scopes"] = [READ, WRITE]
    params["auth"] = {"token": TOKEN}
    if mutate is not None:
        mutate(params)
    res = await raw.connect(params)
    assert res["ok"] is False, case
    # OpenClaw answers INVALID_REQUEST here; clawgate's spec says UNAUTHORIZED (docs/openclaw.md).
    assert res["error"]["code"] == "UNAUTHORIZED", case
    assert res["error"]["details"]["code"] == detail, case
    assert await raw.close_code() == CLOSE_POLICY


async def test_stale_device_signature_is_unauthorized(gw: RunningGateway) -> None:
    raw = await Raw.open(gw.url)
    stale = raw.challenge_ts - DEVICE_SIGNATURE_SKEW_MS - 1
    res = await raw.connect(with_device(raw, DeviceKey(), signed_at=stale))
    assert res["ok"] is False
    assert res["error"]["code"] == "UNAUTHORIZED"
    assert res["error"]["details"] == {
        "code": "DEVICE_AUTH_SIGNATURE_EXPIRED",
        "reason": "device-signature-stale",
    }
    assert await raw.close_code() == CLOSE_POLICY


async def test_valid_device_does_not_replace_a_wrong_token(gw: RunningGateway) -> None:
    raw = await Raw.open(gw.url)
    res = await raw.connect(with_device(raw, DeviceKey(), token="wrong"))
    assert res["ok"] is False
    assert res["error"]["code"] == "UNAUTHORIZED"
    assert res["error"]["message"] == "invalid token"
    assert await raw.close_code() == CLOSE_POLICY


# == agent ========================================================================================
async def test_agent_payloads_have_openclaw_shapes(gw: RunningGateway, clock: FakeClock) -> None:
    raw = await connected(gw.url)
    try:
        key = str(uuid.uuid4())
        # What `openclaw agent -m ...` sends, plus more OpenClaw-only params that must be ignored.
        params = {
            "message": "hello [[reply:hi there]]",
            "agentId": "main",
            "deliver": False,
            "timeout": 600,
            "idempotencyKey": key,
            "channel": "webchat",
            "thinking": "low",
            "lane": "main",
        }
        rid = await raw.request("agent", params)
        accepted = await raw.response(rid)
        assert accepted["ok"] is True, accepted
        assert accepted["payload"] == {
            "runId": key,
            "sessionKey": "agent:main:main",
            "agentId": "main",
            "status": "accepted",
            "acceptedAt": int(clock.time() * 1000),
        }
        final = await raw.response(rid)  # the second response carries the same request id
        assert final["ok"] is True, final
        payload = final["payload"]
        assert payload["runId"] == key
        assert payload["status"] == "ok"
        assert payload["summary"] == "completed"
        assert [p["text"] for p in payload["result"]["payloads"]] == ["hi there"]
        duration = payload["result"]["meta"]["durationMs"]

        waited = await raw.call("agent.wait", {"runId": key, "timeoutMs": 1000})
        assert waited["payload"]["status"] == "ok"
        assert duration == waited["payload"]["endedAt"] - waited["payload"]["startedAt"]

        phases = [e["data"]["phase"] for e in raw.agent(key) if e["stream"] == "lifecycle"]
        assert phases == ["start", "end"]
        assert [e["seq"] for e in raw.agent(key)] == list(range(1, len(raw.agent(key)) + 1))
        chat = raw.chat(key)
        assert [c["state"] for c in chat][-1] == "final"
        assert chat[-1]["message"]["content"] == [{"type": "text", "text": "hi there"}]
    finally:
        await raw.close()


async def test_agent_retry_with_same_key_returns_the_same_run(gw: RunningGateway) -> None:
    raw = await connected(gw.url)
    try:
        key = str(uuid.uuid4())
        params = {"message": "[[reply:once]]", "idempotencyKey": key, "deliver": False}
        rid = await raw.request("agent", params)
        await raw.response(rid)
        first = await raw.response(rid)
        rid2 = await raw.request("agent", params)
        again_accepted = await raw.response(rid2)
        again_final = await raw.response(rid2)
        assert again_accepted["payload"]["runId"] == key
        assert again_accepted["payload"]["status"] == "accepted"
        assert again_final["payload"] == first["payload"]
        await settle(gw.gateway)
        history = await raw.call("chat.history", {"sessionKey": "agent:main:main"})
        assert [m["role"] for m in history["payload"]["messages"]] == ["user", "assistant"]
        assert gw.gateway.runs.totals["ok"] == 1
    finally:
        await raw.close()


async def test_agent_run_error_is_a_final_with_status_error(gw: RunningGateway) -> None:
    raw = await connected(gw.url)
    try:
        key = str(uuid.uuid4())
        rid = await raw.request("agent", {"message": "[[error:provider exploded]]", "idempotencyKey": key})
        assert (await raw.response(rid))["payload"]["status"] == "accepted"
        final = await raw.response(rid)
        assert final["ok"] is True
        assert final["payload"]["runId"] == key
        assert final["payload"]["status"] == "error"
        assert final["payload"]["summary"] == "provider exploded"
        assert final["payload"]["result"]["payloads"] == []
    finally:
        await raw.close()


async def test_agent_known_params_stay_strict(gw: RunningGateway) -> None:
    raw = await connected(gw.url)
    try:
        missing = await raw.call("agent", {"message": "hi", "deliver": False})
        assert missing["ok"] is False
        assert missing["error"]["code"] == "INVALID_REQUEST"
        assert missing["error"]["details"] == {"field": "params.idempotencyKey"}
        wrong_type = await raw.call("agent", {"message": "hi", "idempotencyKey": "k", "timeout": "600"})
        assert wrong_type["error"]["code"] == "INVALID_REQUEST"
        assert wrong_type["error"]["details"] == {"field": "params.timeout"}
    finally:
        await raw.close()


# == chat.send and chat events =====================================================================
async def test_chat_send_streams_delta_then_final(gw: RunningGateway) -> None:
    raw = await connected(gw.url)
    try:
        key = str(uuid.uuid4())
        session = "agent:main:chat-compat"
        res = await raw.call(
            "chat.send",
            {
                "sessionKey": session,
                "message": "[[reply:alpha beta gamma]] [[chunks:3]]",
                "idempotencyKey": key,
            },
        )
        assert res["payload"] == {"runId": key, "status": "started"}
        final = (await raw.event(is_chat(key, "final")))["payload"]
        chat = raw.chat(key)
        assert [c["state"] for c in chat] == ["delta", "delta", "delta", "final"]
        assert [c["seq"] for c in chat] == [1, 2, 3, 4]
        assert all(c["sessionKey"] == session for c in chat)
        deltas = [c["deltaText"] for c in chat[:-1]]
        assert "".join(deltas) == "alpha beta gamma"
        # each delta carries the text so far, shaped as OpenClaw's chat clients render it
        texts = [c["message"]["content"][0]["text"] for c in chat[:-1]]
        assert texts == ["".join(deltas[: i + 1]) for i in range(3)]
        assert final["message"]["role"] == "assistant"
        assert final["message"]["content"] == [{"type": "text", "text": "alpha beta gamma"}]
        assert isinstance(final["message"]["timestamp"], int)
    finally:
        await raw.close()


async def test_chat_abort_emits_aborted(gw: RunningGateway) -> None:
    raw = await connected(gw.url)
    try:
        key = str(uuid.uuid4())
        session = "agent:main:chat-abort"
        res = await raw.call(
            "chat.send", {"sessionKey": session, "message": "[[stall]]", "idempotencyKey": key}
        )
        assert res["payload"]["status"] == "started"
        await raw.event(is_lifecycle(key, "start"))
        aborted = await raw.call("chat.abort", {"sessionKey": session, "runId": key})
        assert aborted["payload"] == {"ok": True, "aborted": True, "runIds": [key]}
        event = (await raw.event(is_chat(key, "aborted")))["payload"]
        assert event["sessionKey"] == session
        assert [c["state"] for c in raw.chat(key)] == ["aborted"]
        waited = await raw.call("agent.wait", {"runId": key, "timeoutMs": 1000})
        assert waited["payload"]["status"] == "aborted"
    finally:
        await raw.close()


async def test_chat_run_error_emits_error_state(gw: RunningGateway) -> None:
    raw = await connected(gw.url)
    try:
        key = str(uuid.uuid4())
        session = "agent:main:chat-error"
        await raw.call(
            "chat.send", {"sessionKey": session, "message": "[[error:kaboom]]", "idempotencyKey": key}
        )
        event = (await raw.event(is_chat(key, "error")))["payload"]
        assert event["errorMessage"] == "kaboom"
        assert event["sessionKey"] == session
        assert [c["state"] for c in raw.chat(key)] == ["error"]
    finally:
        await raw.close()
