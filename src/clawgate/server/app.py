"""The Starlette app: WebSocket RPC on `/`, `/healthz`, `/readyz`, `/metrics` on the same port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from clawgate.server.connection import CLOSE_TRY_LATER, Connection
from clawgate.server.gateway import Gateway


def create_app(gateway: Gateway, *, manage_lifecycle: bool = True) -> Starlette:
    async def ws_endpoint(ws: WebSocket) -> None:
        refusal = gateway.admit_connection()
        if refusal is not None:
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

    async def metrics(request: Request) -> Response:
        return Response(gateway.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_lifecycle:
            await gateway.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await gateway.stop("server shutdown")

    return Starlette(
        routes=[
            WebSocketRoute("/", ws_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
