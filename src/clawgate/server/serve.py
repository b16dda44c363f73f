"""Run a gateway under uvicorn (uvloop, websockets-sansio), in-process or as the CLI's foreground server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from clawgate import logs
from clawgate.server.app import create_app
from clawgate.server.credentials import exposure_problems
from clawgate.server.fdlimit import ensure_fd_limit
from clawgate.server.gateway import Gateway
from clawgate.server.gcpolicy import tune_gc
from clawgate.server.protocols import guarded_protocols
from clawgate.settings import load_settings


def uvicorn_config(gateway: Gateway, app: Any, sock: socket.socket | None = None) -> uvicorn.Config:
    s = gateway.settings
    # h11 and websockets-sansio, with the socket ledger, header timeout and pong accounting.
    http, ws = guarded_protocols(gateway)
    return uvicorn.Config(
        app,
        host=s.bind,
        port=s.port,
        ws=ws,
        loop="none",
        http=http,
        lifespan="off",
        log_level="warning",
        access_log=False,
        # The protocol answers frames over maxPayload with INVALID_REQUEST + close 1009; uvicorn's own
        # ceiling (4x) only catches frames so large that reading them whole would be the attack.
        ws_max_size=max(4 * s.max_payload_bytes, 1 << 20),
        # Compression costs more CPU per frame than it saves on loopback and LAN links.
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=max(1, int(s.shutdown_grace_s)),
    )


class RunningGateway:
    """A gateway served on a real socket inside the current event loop (tests, `clawgate batch`)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def host(self) -> str:
        """Where a local client reaches the socket (a wildcard bind is reached on loopback)."""
        bind = self.gateway.settings.bind
        if bind in ("", "0.0.0.0", "localhost"):
            return "127.0.0.1"
        if ":" in bind:
            return "[::1]" if bind == "::" else f"[{bind}]"
        return bind

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> RunningGateway:
        settings = self.gateway.settings
        problems = exposure_problems(settings, self.gateway.credentials)
        if problems:
            # Without a token the gateway only binds loopback, and off loopback tokens must be
            # strong, however it is started.
            raise RuntimeError("; ".join(problems))
        ensure_fd_limit(settings)
        # Bind before starting anything: a busy port must not leave a started gateway behind.
        sock = _listen_socket(settings.bind, settings.port)
        self.port = sock.getsockname()[1]
        try:
            await self.gateway.start()
            app = create_app(self.gateway)
            config = uvicorn_config(self.gateway, app)
            server = _QuietServer(config)
            self.server = server
            # Not under the gateway's supervisor: the server outlives the gateway's stop (which
            # closes the supervisor) and ends by `should_exit`, not by a cancellation; this
            # object awaits it. A crash of it is counted all the same.
            self._task = asyncio.create_task(server.serve(sockets=[sock]), name="clawgate-uvicorn")
            self._task.add_done_callback(self._served)
            while not server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("uvicorn stopped before serving")
                await asyncio.sleep(0.005)
        except BaseException:
            await self.stop()
            sock.close()
            raise
        return self

    def _served(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.gateway.supervisor.record_failure("uvicorn", exc)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        await self.gateway.stop("server shutdown")
        if self.server is not None:
            self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@contextlib.asynccontextmanager
async def embedded_gateway(
    state_dir: Path | None = None, sets: dict[str, Any] | None = None
) -> AsyncIterator[RunningGateway]:
    """A gateway served in this process on a free 127.0.0.1 port (`clawgate batch` without
    --url, the demo): settings from `sets` over the defaults; yields its RunningGateway."""
    overrides: dict[str, Any] = {"port": 0, "bind": "127.0.0.1", "state_dir": state_dir}
    overrides.update(sets or {})
    settings = load_settings(None, **overrides)
    # The progress bar owns the terminal; only problems are worth a log line.
    logs.configure("warning")
    running = RunningGateway(Gateway(settings))
    await running.__aenter__()
    try:
        yield running
    finally:
        await running.stop()


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers (the owner of the loop handles signals)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


async def serve_forever(gateway: Gateway) -> int:
    """Serve until SIGINT/SIGTERM; then send `shutdown`, drain, flush the store, return 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with RunningGateway(gateway) as running:
        gateway_url = running.url
        from structlog import get_logger

        # This process is the gateway's own: its collector gets the server policy.
        tune_gc(gateway.settings.gc_threshold0)
        get_logger("clawgate").info("listening", url=gateway_url, http=running.http_url)
        print(f"clawgate listening on {gateway_url} (store: {gateway.store.kind})", flush=True)
        await stop.wait()
    return 0
