"""The Starlette app: WebSocket RPC on `/`, `/healthz`, `/readyz`, `/metrics` and the `/ui` dashboard on the same port."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from clawgate.protocol.constants import CLOSE_TRY_LATER
from clawgate.server.connection import RAW_SEND_SCOPE_KEY, Connection
from clawgate.server.gateway import Gateway
from clawgate.server.http_api import RestApi
from clawgate.server.http_events import RunEventLog
from clawgate.server.http_openai import OpenAIApi
from clawgate.server.openapi import build_openapi
from clawgate.server.origin import OriginHostGuard
from clawgate.server.ui import ui_routes


class RawSendMiddleware:
    """Keep the server's own `send` in the WebSocket scope.

    Starlette wraps `send` in closures on the way to the endpoint, hiding the
    server protocol object; a connection whose peer stopped reading needs it to
    drop the transport, since not even a close frame can go out then.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[RAW_SEND_SCOPE_KEY] = send
        await self.app(scope, receive, send)


def create_app(gateway: Gateway) -> Starlette:
    """The app over a gateway; the gateway's start and stop belong to its runner (server/serve.py)."""

    async def ws_endpoint(ws: WebSocket) -> None:
        refusal = gateway.admit_connection()
        if refusal is not None:
            # Accept first so the client gets a WebSocket close (1013, retryable, with the reason)
            # instead of a bare HTTP 403 on the upgrade.
            await ws.accept()
            await ws.close(CLOSE_TRY_LATER, refusal)
            return
        conn = Connection(gateway, ws)
        gateway.adopt(conn)
        try:
            await conn.serve()
        finally:
            gateway.forget(conn)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "uptimeMs": gateway.uptime_ms()})

    async def readyz(request: Request) -> Response:
        ok, reason = await gateway.ready()
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    openapi_doc = build_openapi(gateway.settings)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_doc)

    async def metrics(request: Request) -> Response:
        return Response(gateway.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def refused(peer: str, reason: str) -> None:
        gateway.peer_log.warning(peer, "request refused", reason=reason)

    s = gateway.settings
    events = RunEventLog(
        gateway.bus,
        gateway.clock,
        gateway.registry,
        capacity=s.http_event_buffer_events,
        max_runs=s.http_event_buffers_max,
        ttl_s=s.run_result_ttl_s,
        watch_ttl_s=s.abort_ttl_max_s,
    )
    return Starlette(
        routes=[
            WebSocketRoute("/", ws_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
            *RestApi(gateway, events).routes(),
            *OpenAIApi(gateway, events).routes(),
            *ui_routes(),
        ],
        # The origin/host guard comes first: it refuses cross-site pages and rebound host names
        # on every entry point, before a WebSocket is upgraded or an endpoint runs.
        middleware=[
            Middleware(OriginHostGuard, settings=gateway.settings, on_refused=refused),
            Middleware(RawSendMiddleware),
        ],
    )
