"""The handshake's pure decisions (server/handshake.py): the grant and the hello-ok, without sockets."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from clawgate.errors import Unauthorized
from clawgate.protocol.constants import ADMIN, READ, SCOPE_NAMES, WRITE
from clawgate.protocol.schemas import ConnectParams
from clawgate.server.credentials import Credential, Credentials
from clawgate.server.handshake import EVENTS, grant_for, hello_ok
from conftest import make_settings

TOKEN = "s3cret-token-of-enough-length"


def params(**fields: object) -> ConnectParams:
    return msgspec.convert({"minProtocol": 3, "maxProtocol": 4, **fields}, ConnectParams)


def test_without_tokens_a_client_gets_what_it_asks_for_and_read_when_it_does_not_say() -> None:
    grant = grant_for(params(), Credentials(), nonce="n", now_ms=0)
    assert (grant.protocol, grant.method, grant.credential) == (4, "none", None)
    assert grant.scopes == frozenset({READ})
    grant = grant_for(params(scopes=[ADMIN]), Credentials(), nonce="n", now_ms=0)
    assert grant.scopes == frozenset(SCOPE_NAMES)


def test_a_token_is_required_once_one_is_configured_and_caps_the_scopes() -> None:
    creds = Credentials((Credential("reader", TOKEN, frozenset({READ})),))
    with pytest.raises(Unauthorized):
        grant_for(params(), creds, nonce="n", now_ms=0)
    with pytest.raises(Unauthorized):
        grant_for(params(auth={"token": "wrong"}), creds, nonce="n", now_ms=0)
    grant = grant_for(params(auth={"token": TOKEN}, scopes=[READ]), creds, nonce="n", now_ms=0)
    assert (grant.method, grant.credential, grant.scopes) == ("token", "reader", frozenset({READ}))


def test_hello_ok_names_only_the_schema_fields(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_payload_bytes=1 << 20, tick_interval_s=15)
    grant = grant_for(params(scopes=[WRITE, ADMIN]), Credentials(), nonce="n", now_ms=0)
    hello = hello_ok(
        grant,
        conn_id="c1",
        settings=settings,
        methods=["status", "health"],
        uptime_ms=42,
        auth_required=False,
    )
    assert set(hello) == {"type", "protocol", "server", "features", "snapshot", "policy", "auth"}
    assert hello["type"] == "hello-ok" and hello["protocol"] == 4
    assert hello["server"]["connId"] == "c1"
    assert hello["features"] == {"methods": ["health", "status"], "events": EVENTS}
    assert hello["snapshot"]["uptimeMs"] == 42 and hello["snapshot"]["authMode"] == "none"
    assert hello["policy"] == {
        "maxPayload": 1 << 20,
        "maxBufferedBytes": settings.max_buffered_bytes,
        "tickIntervalMs": 15_000,
    }
    assert hello["auth"] == {"method": "none", "role": "operator", "scopes": sorted(grant.scopes)}
