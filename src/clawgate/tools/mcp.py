"""MCP tool servers: started on demand, shared by runs, restarted with backoff, stopped at shutdown.

One `McpServer` per configured `[mcp_servers.<name>]`. Its connection (a stdio subprocess or
a streamable-HTTP session) lives in one owner task, because the SDK's transports are anyio
context managers that must be entered and left in the same task. Calls from any run share
that session. A call that finds the connection broken (the process died, the HTTP session is
gone) tears it down and returns an error result; the next call starts it again once the
backoff (`mcp_restart_base_s * 2^(failures-1)`, capped) has passed. At most `mcp_max_servers`
connections are open at once (`mcp_sessions` in the state registry).

A stdio server gets only PATH and the few variables the SDK deems safe (HOME, USER, SHELL,
TERM, LOGNAME), plus its configured `env`: never the gateway's token or the whole environment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import structlog

from clawgate.agent.tools import WRITE_SCOPE, Tool, ToolCallContext
from clawgate.agents.profiles import Profile
from clawgate.providers.base import ToolSpec
from clawgate.settings import McpServerConfig, Settings
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor

log = structlog.get_logger("clawgate.mcp")

LIST_PAGES_MAX = 10  # tools/list pages read per server (a server cannot make us page forever)
TOOLS_MAX = 256  # tools kept per server
STOP_TIMEOUT_S = 5.0
RELAY_BUFFER = 64  # server messages buffered between the transport and the session


class McpUnavailable(Exception):
    """The server could not be started (or is waiting out its restart backoff)."""


class McpServer:
    def __init__(
        self, name: str, config: McpServerConfig, clock: Clock, settings: Settings, tasks: Supervisor
    ) -> None:
        self.name = name
        self.tasks = tasks
        self.config = config
        self.clock = clock
        self.settings = settings
        self.session: Any = None  # mcp.ClientSession while connected
        self.tool_defs: list[Any] = []  # mcp types.Tool
        self.task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self.failures = 0  # consecutive failed starts or broken connections
        self.retry_at = 0.0  # clock.monotonic() before which no start is tried
        self.starts = 0
        self.calls_in_flight = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self.session is not None and self.task is not None and not self.task.done()

    def _backoff_s(self) -> float:
        s = self.settings
        return float(min(s.mcp_restart_max_s, s.mcp_restart_base_s * 2 ** max(0, self.failures - 1)))

    async def ensure(self, may_open: bool) -> None:
        """Connected on return, or McpUnavailable."""
        if self.connected:
            return
        async with self._lock:
            if self.connected:
                return
            await self._teardown()
            now = self.clock.monotonic()
            if now < self.retry_at:
                raise McpUnavailable(
                    f"MCP server {self.name!r} is restarting (next start in {self.retry_at - now:.1f} s): "
                    f"{self.last_error or 'it stopped'}"
                )
            if not may_open:
                raise McpUnavailable(
                    f"too many MCP servers running (mcp_max_servers {self.settings.mcp_max_servers})"
                )
            self._stop = asyncio.Event()
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.task = self.tasks.spawn(self._own(ready), name="mcp-server")
            self.starts += 1
            try:
                # A real-time bound: starting a process and its handshake is I/O, not a TTL.
                await asyncio.wait_for(asyncio.shield(ready), self.settings.mcp_connect_timeout_s)
            except BaseException as exc:
                await self._teardown()
                self._failed(exc)
                raise McpUnavailable(f"MCP server {self.name!r} could not start: {self.last_error}") from None
            log.info("mcp server started", server=self.name, tools=len(self.tool_defs), starts=self.starts)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.retry_at = self.clock.monotonic() + self._backoff_s()

    async def _own(self, ready: asyncio.Future[None]) -> None:
        from mcp import ClientSession

        try:
            async with self._transport() as (read, write):
                # Messages pass through a relay so that the end of the server's stream (a
                # process that died while idle) is seen at once, not by the next call.
                relay_send, relay_recv = anyio.create_memory_object_stream[Any](RELAY_BUFFER)
                async with anyio.create_task_group() as group:
                    group.start_soon(self._relay, read, relay_send)
                    async with ClientSession(relay_recv, write) as session:
                        await session.initialize()
                        self.tool_defs = await _list_tools(session)
                        self.session = session
                        if not ready.done():
                            ready.set_result(None)
                        await self._stop.wait()
                    group.cancel_scope.cancel()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            elif not self._stop.is_set():
                log.warning("mcp server connection ended", server=self.name, error=repr(exc)[:300])
                self._failed(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.session = None

    async def _relay(self, read: Any, send: Any) -> None:
        async with send:
            async for message in read:
                await send.send(message)
        if not self._stop.is_set():
            # The server closed its end: the process died or the connection dropped.
            log.warning("mcp server went away", server=self.name)
            self._failed(ConnectionError("the server closed the connection"))
            self.session = None
            self._stop.set()

    @contextlib.asynccontextmanager
    async def _transport(self) -> AsyncIterator[Any]:
        cfg = self.config
        if cfg.command is not None:
            from mcp import StdioServerParameters, stdio_client

            params = StdioServerParameters(
                command=cfg.command, args=list(cfg.args), env=dict(cfg.env), cwd=cfg.cwd
            )
            async with stdio_client(params) as streams:
                yield streams
        else:
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client

            assert cfg.url is not None
            async with (
                create_mcp_http_client(headers=dict(cfg.headers)) as http,
                streamable_http_client(cfg.url, http_client=http) as streams,
            ):
                yield streams

    async def _teardown(self) -> None:
        task, self.task = self.task, None
        self.session = None
        if task is None:
            return
        self._stop.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_S)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        with contextlib.suppress(BaseException):
            await task

    async def stop(self) -> None:
        async with self._lock:
            await self._teardown()

    async def call(self, tool: str, args: dict[str, Any], may_open: bool) -> dict[str, Any]:
        try:
            await self.ensure(may_open)
        except McpUnavailable as exc:
            return {"status": "error", "error": str(exc)}
        session = self.session
        self.calls_in_flight += 1
        try:
            result = await session.call_tool(tool, args)
        except Exception as exc:
            # The connection broke under the call (the process died, the session is gone):
            # the run gets an error result; the next call starts the server again.
            error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("mcp call failed", server=self.name, error=error[:300])
            if self.session is session:  # not already seen going away by the relay
                self._failed(exc)
                async with self._lock:
                    if self.session is session:
                        await self._teardown()
            return {"status": "error", "error": f"MCP server {self.name!r} failed: {error}"}
        finally:
            self.calls_in_flight -= 1
        self.failures = 0
        return _result(result)


async def _list_tools(session: Any) -> list[Any]:
    tools: list[Any] = []
    cursor = None
    for _ in range(LIST_PAGES_MAX):
        from mcp import types

        page = await session.list_tools(
            params=types.PaginatedRequestParams(cursor=cursor) if cursor else None
        )
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor or len(tools) >= TOOLS_MAX:
            break
    return tools[:TOOLS_MAX]


def _result(result: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": "error" if result.is_error else "ok",
        "content": [
            block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content
        ],
    }
    if result.structured_content is not None:
        out["structuredContent"] = result.structured_content
    return out


class McpManager:
    def __init__(
        self, settings: Settings, clock: Clock, registry: StateRegistry, *, tasks: Supervisor | None = None
    ) -> None:
        self.settings = settings
        # Each server's connection task is owned by the gateway's task supervisor (a private
        # one for a manager built alone); at most `mcp_max_servers` (mcp_sessions, below).
        tasks = tasks or Supervisor()
        self.servers = {
            name: McpServer(name, cfg, clock, settings, tasks) for name, cfg in settings.mcp_servers.items()
        }
        registry.add("mcp_sessions", self.open_count, ttl_s=None, max_size=settings.mcp_max_servers)
        # Calls in flight end with their run (each is awaited, with a timeout, by the agent loop).
        registry.add(
            "mcp_calls_in_flight",
            lambda: sum(s.calls_in_flight for s in self.servers.values()),
            ttl_s=None,
            max_size=settings.max_tracked_runs * 32,
            per_run=True,
        )

    def open_count(self) -> int:
        return sum(1 for s in self.servers.values() if s.task is not None)

    def _may_open(self) -> bool:
        return self.open_count() < self.settings.mcp_max_servers

    async def tools_for(self, profile: Profile) -> Mapping[str, Tool]:
        """The tools of the servers `profile` names, those its allowlist allows; a server that
        cannot start offers none (the run goes on without them)."""
        tools: dict[str, Tool] = {}
        for name in sorted(profile.mcp_servers()):
            server = self.servers.get(name)
            if server is None:
                continue
            try:
                await server.ensure(self._may_open())
            except McpUnavailable as exc:
                log.warning("mcp server unavailable", server=name, error=str(exc)[:300])
                continue
            for definition in server.tool_defs:
                full = f"{name}.{definition.name}"
                if profile.allows(full):
                    tools[full] = self._tool(server, definition, full)
        return tools

    def _tool(self, server: McpServer, definition: Any, full: str) -> Tool:
        tool_name = definition.name

        async def handler(ctx: ToolCallContext, args: dict[str, Any]) -> dict[str, Any]:
            return await server.call(tool_name, args, self._may_open())

        spec = ToolSpec(
            name=full,
            description=definition.description or "",
            parameters=dict(definition.input_schema or {"type": "object"}),
        )
        return Tool(spec, handler, scope=WRITE_SCOPE, source=f"mcp:{server.name}")

    def stats(self) -> dict[str, Any]:
        return {
            name: {
                "connected": s.connected,
                "starts": s.starts,
                "failures": s.failures,
                "callsInFlight": s.calls_in_flight,
                "tools": len(s.tool_defs),
                **({"lastError": s.last_error} if s.last_error else {}),
            }
            for name, s in self.servers.items()
        }

    async def close(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers.values()), return_exceptions=True)
