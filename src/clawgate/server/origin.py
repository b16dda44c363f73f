"""Which browser pages and host names may reach the gateway (pure checks + an ASGI guard).

A browser lets any page open a WebSocket to `ws://127.0.0.1:18789/`: the
WebSocket handshake is not subject to the same-origin policy. Without these
checks a page in the user's browser could run agents, read transcripts and
delete sessions on a gateway without a token (cross-site WebSocket hijacking),
and a page whose name was rebound to 127.0.0.1 (DNS rebinding) could even read
the HTTP endpoints. So every request, WebSocket or HTTP, must:

* carry a Host header that names the gateway: a loopback name or address, the
  bind address (any address when bound to a wildcard: a rebinding attack needs
  a DNS *name*), or an entry of `allowed_hosts`;
* carry no Origin (CLIs and SDKs send none), or the gateway's own origin (a
  page served by the gateway itself), or an entry of `allowed_origins`.

`/healthz` gets no exception: probes send no Origin and address the gateway by
an IP or `localhost`, so the checks never refuse them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from clawgate.clip import clip
from clawgate.protocol.constants import CLOSE_POLICY, FORBIDDEN
from clawgate.settings import Settings, is_loopback

WILDCARD_BINDS = ("", "0.0.0.0", "::")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# Scope key the guard sets on a WebSocket scope that carried an allowed Origin: a browser page
# is talking, so the loopback exemption from the failed-auth limit does not apply.
BROWSER_SCOPE_KEY = "clawgate.browser_origin"


def split_host(host_header: str) -> tuple[str, int | None]:
    """(`name`, `port`) of a Host header value; the name lowercased, without brackets or final dot."""
    value = host_header.strip().lower()
    port: int | None = None
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[1:end], value[end + 1 :]) if end > 0 else (value, "")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif value.count(":") == 1:
        name, _, tail = value.partition(":")
        port = int(tail) if tail.isdigit() else None
    else:
        name = value  # a bare name, or an unbracketed IPv6 address
    return name.rstrip("."), port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str | None, settings: Settings) -> bool:
    if host_header is None:
        return True  # no Host at all: not a browser (every browser sends one)
    name, _ = split_host(host_header)
    if name == "localhost" or name.endswith(".localhost") or is_loopback(name):
        # Browsers resolve *.localhost to loopback themselves (RFC 6761), so it cannot be rebound.
        return True
    bind = settings.bind.strip("[]").lower()
    if name == bind or (bind in WILDCARD_BINDS and _is_ip(name)):
        return True
    allowed = {h.strip().lower().rstrip(".") for h in settings.allowed_hosts}
    return name in allowed or host_header.strip().lower() in allowed


def normalize_origin(origin: str) -> str | None:
    """`scheme://host:port` with the default port made explicit, or None if it is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in ("http", "https") or not host:
        return None  # "null" (sandboxed frames, file://) and anything odd is no allowed origin
    port = port if port is not None else _DEFAULT_PORTS[scheme]
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def origin_allowed(origin: str, host_header: str | None, scope_scheme: str, settings: Settings) -> bool:
    seen = normalize_origin(origin)
    if seen is None:
        return False
    if host_header:
        # The gateway's own origin: a page it serves itself (same scheme, host and port).
        own_scheme = "https" if scope_scheme in ("https", "wss") else "http"
        if seen == normalize_origin(f"{own_scheme}://{host_header.strip()}"):
            return True
    return seen in {normalize_origin(o) for o in settings.allowed_origins}


def refusal(headers: dict[str, str], scope_scheme: str, settings: Settings) -> str | None:
    """Why a request with these headers must be refused (None: let it through)."""
    host = headers.get("host")
    if not host_allowed(host, settings):
        return f"host not allowed: {clip(host)} (see allowed_hosts)"
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, host, scope_scheme, settings):
        return f"origin not allowed: {clip(origin)} (see allowed_origins)"
    return None


def _headers(scope: Scope) -> dict[str, str]:
    # The last value wins for a repeated header; both names here are single-valued by RFC.
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class OriginHostGuard:
    """Refuse (HTTP 403, before any WebSocket upgrade) requests from pages or hosts not allowed.

    `on_refused(peer, reason)` is told about each refusal (for a rate-limited log line).
    """

    def __init__(
        self, app: ASGIApp, settings: Settings, on_refused: Callable[[str, str], None] | None = None
    ) -> None:
        self.app = app
        self.settings = settings
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        reason = refusal(headers, scope.get("scheme", "http"), self.settings)
        if reason is None:
            if scope["type"] == "websocket" and "origin" in headers:
                scope[BROWSER_SCOPE_KEY] = True
            await self.app(scope, receive, send)
            return
        if self.on_refused is not None:
            client = scope.get("client")
            self.on_refused(client[0] if client else "", reason)
        body = json.dumps({"ok": False, "error": {"code": FORBIDDEN, "message": reason}}).encode()
        start = {
            "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
        if scope["type"] == "http":
            await send({"type": "http.response.start", **start})
            await send({"type": "http.response.body", "body": body})
            return
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", **start})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": CLOSE_POLICY})  # the server answers 403
