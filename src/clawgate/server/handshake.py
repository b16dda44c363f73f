"""The `connect` handshake's decisions (pure): the grant a client gets, and the hello-ok it reads.

The gateway keeps the effects around them: the per-peer failure limiter, the pending
handshake count, attaching the connection to the event bus.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from clawgate import __version__
from clawgate.protocol.device import signature_token, verify_device_signature
from clawgate.protocol.schemas import ConnectParams
from clawgate.server.auth import Grant, authorize
from clawgate.server.credentials import Credentials
from clawgate.settings import Settings

EVENTS = [
    "connect.challenge",
    "agent",
    "chat",
    "subagent",
    "sessions.changed",
    "session.message",
    "tick",
    "shutdown",
]


def grant_for(params: ConnectParams, credentials: Credentials, *, nonce: str, now_ms: int) -> Grant:
    """What the client may do: its token (or none) and, when it presents one, its device signature
    over this connection's nonce. Raises Unauthorized / InvalidRequest / Forbidden."""
    grant = authorize(params, credentials)
    if params.device is not None:
        verify_device_signature(
            params.device,
            client_id=params.client.id,
            client_mode=params.client.mode,
            role=params.role,
            scopes=params.scopes or [],
            token=signature_token(msgspec.to_builtins(params.auth) if params.auth else None),
            nonce=nonce,
            now_ms=now_ms,
            platform=params.client.platform,
            device_family=params.client.device_family,
        )
    return grant


def hello_ok(
    grant: Grant,
    *,
    conn_id: str,
    settings: Settings,
    methods: Iterable[str],
    uptime_ms: int,
    auth_required: bool,
) -> dict[str, Any]:
    """The hello-ok payload.

    Every object of OpenClaw's HelloOkSchema is closed (additionalProperties: false), so only
    fields that schema names go here: stricter OpenClaw clients reject anything else.
    """
    s = settings
    return {
        "type": "hello-ok",
        "protocol": grant.protocol,
        "server": {"version": __version__, "connId": conn_id},
        "features": {"methods": sorted(methods), "events": EVENTS},
        "snapshot": {
            "presence": [],
            "health": {"ok": True},
            "stateVersion": {"presence": 0, "health": 0},
            "uptimeMs": uptime_ms,
            "sessionDefaults": {
                "defaultAgentId": "main",
                "mainKey": "main",
                "mainSessionKey": "agent:main:main",
            },
            "authMode": "token" if auth_required else "none",
        },
        "policy": {
            "maxPayload": s.max_payload_bytes,
            "maxBufferedBytes": s.max_buffered_bytes,
            "tickIntervalMs": int(s.tick_interval_s * 1000),
        },
        "auth": {
            "method": grant.method,
            "role": grant.role,
            "scopes": sorted(grant.scopes),
        },
    }


__all__ = ["EVENTS", "grant_for", "hello_ok"]
