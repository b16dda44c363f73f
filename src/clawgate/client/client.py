"""An async client for the clawgate (and OpenClaw) gateway protocol.

    async with Client("ws://127.0.0.1:18789/", token="...") as c:
        final = await c.run_agent("summarise ticket 42", idempotency_key="ticket-42")
        print(final["result"]["payloads"][0]["text"])

`call` sends one request and returns its (first) response payload or raises
`ClientError` carrying the wire error (`code`, `retryable`, `retry_after_ms`).
After a lost connection the next call reconnects, with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection

from clawgate import __version__

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

EVENT_QUEUE_MAX = 10_000


class ClientError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms

    @classmethod
    def from_wire(cls, error: dict[str, Any]) -> ClientError:
        return cls(
            str(error.get("code", "INTERNAL")),
            str(error.get("message", "")),
            details=error.get("details"),
            retryable=bool(error.get("retryable", False)),
            retry_after_ms=error.get("retryAfterMs"),
        )


class ConnectionLost(ClientError):
    def __init__(self, message: str = "connection lost") -> None:
        super().__init__("CONNECTION_LOST", message, retryable=True, retry_after_ms=200)


class _Pending:
    __slots__ = ("expect", "queue")

    def __init__(self, expect: int) -> None:
        self.expect = expect  # number of responses this request gets (agent: 2)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()


class Client:
    def __init__(
        self,
        url: str = "ws://127.0.0.1:18789/",
        *,
        token: str | None = None,
        scopes: list[str] | None = None,
        client_id: str = "clawgate-client",
        open_timeout: float = 10.0,
        max_reconnect_attempts: int = 6,
        max_size: int = 8 * 1024 * 1024,
    ) -> None:
        self.url = url
        self.token = token
        self.scopes = scopes or ["operator.read", "operator.write"]
        self.client_id = client_id
        self.open_timeout = open_timeout
        self.max_reconnect_attempts = max_reconnect_attempts
        self.max_size = max_size
        self.hello: dict[str, Any] = {}
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._run_queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_MAX)
        self.events_dropped = 0
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self.reconnects = 0

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection --------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._ws is not None and self._reader is not None and not self._reader.done()

    async def connect(self) -> dict[str, Any]:
        async with self._connect_lock:
            if self.connected:
                return self.hello
            delay = 0.1
            for attempt in range(self.max_reconnect_attempts + 1):
                try:
                    return await self._open()
                except ClientError as exc:
                    if not exc.retryable or attempt >= self.max_reconnect_attempts:
                        raise
                except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                    if attempt >= self.max_reconnect_attempts:
                        raise ConnectionLost(f"cannot connect to {self.url}: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                self.reconnects += 1
            raise ConnectionLost(f"cannot connect to {self.url}")

    async def _open(self) -> dict[str, Any]:
        ws = await websockets.connect(
            self.url,
            open_timeout=self.open_timeout,
            max_size=self.max_size,
            ping_interval=None,
            close_timeout=2,
        )
        try:
            challenge = _decoder.decode(await asyncio.wait_for(ws.recv(), self.open_timeout))
            if challenge.get("event") != "connect.challenge":
                raise ClientError("INVALID_REQUEST", "expected connect.challenge")
            params: dict[str, Any] = {
                "minProtocol": 3,
                "maxProtocol": 4,
                "client": {
                    "id": self.client_id,
                    "version": __version__,
                    "platform": "python",
                    "mode": "cli",
                    "instanceId": str(uuid.uuid4()),
                },
                "role": "operator",
                "scopes": self.scopes,
                "caps": [],
            }
            if self.token is not None:
                params["auth"] = {"token": self.token}
            await ws.send(
                _encoder.encode(
                    {"type": "req", "id": "connect", "method": "connect", "params": params}
                ).decode()
            )
            reply = _decoder.decode(await asyncio.wait_for(ws.recv(), self.open_timeout))
            if not reply.get("ok"):
                raise ClientError.from_wire(reply.get("error") or {})
        except BaseException:
            await ws.close()
            raise
        self._ws = ws
        self.hello = reply["payload"]
        self._reader = asyncio.create_task(self._read_loop(ws), name="clawgate-client-reader")
        return self.hello

    async def close(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._fail_pending(ConnectionLost("client closed"))

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                frame = _decoder.decode(raw)
                kind = frame.get("type")
                if kind == "res":
                    pending = self._pending.get(frame.get("id"))
                    if pending is not None:
                        pending.queue.put_nowait(frame)
                elif kind == "event":
                    self._on_event(frame)
        except websockets.exceptions.ConnectionClosed:
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            self._fail_pending(ConnectionLost())

    def _on_event(self, frame: dict[str, Any]) -> None:
        payload = frame.get("payload") or {}
        if self.on_event is not None:
            self.on_event(frame)
        run_id = payload.get("runId") if isinstance(payload, dict) else None
        if run_id is not None and run_id in self._run_queues:
            self._run_queues[run_id].put_nowait(frame)
        try:
            self.events.put_nowait(frame)
        except asyncio.QueueFull:
            self.events_dropped += 1
            with contextlib.suppress(asyncio.QueueEmpty):
                self.events.get_nowait()
            self.events.put_nowait(frame)

    def _fail_pending(self, exc: ClientError) -> None:
        for pending in self._pending.values():
            pending.queue.put_nowait(
                {
                    "type": "res",
                    "ok": False,
                    "error": {
                        "code": exc.code,
                        "message": exc.message,
                        "retryable": True,
                        "retryAfterMs": 200,
                    },
                }
            )

    # -- requests -------------------------------------------------------------------------------
    async def _send(self, method: str, params: dict[str, Any], expect: int) -> tuple[str, _Pending]:
        if self._closed:
            raise ConnectionLost("client closed")
        if not self.connected:
            await self.connect()
        assert self._ws is not None
        req_id = f"r{next(self._ids)}"
        pending = _Pending(expect)
        self._pending[req_id] = pending
        try:
            await self._ws.send(
                _encoder.encode({"type": "req", "id": req_id, "method": method, "params": params}).decode()
            )
        except websockets.exceptions.ConnectionClosed as exc:
            self._pending.pop(req_id, None)
            raise ConnectionLost(str(exc)) from exc
        return req_id, pending

    @staticmethod
    def _unwrap(frame: dict[str, Any]) -> dict[str, Any]:
        if frame.get("ok"):
            payload = frame.get("payload")
            return payload if isinstance(payload, dict) else {"value": payload}
        raise ClientError.from_wire(frame.get("error") or {})

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        req_id, pending = await self._send(method, params or {}, 1)
        try:
            frame = await asyncio.wait_for(pending.queue.get(), timeout)
        finally:
            self._pending.pop(req_id, None)
        return self._unwrap(frame)

    async def call_final(
        self,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float | None = None,
        on_accepted: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """A request answered twice (accepted, then final): returns the final payload."""
        req_id, pending = await self._send(method, params, 2)
        try:
            first = self._unwrap(await asyncio.wait_for(pending.queue.get(), timeout))
            if first.get("status") != "accepted":
                return first
            if on_accepted is not None:
                on_accepted(first)
            return self._unwrap(await asyncio.wait_for(pending.queue.get(), timeout))
        finally:
            self._pending.pop(req_id, None)

    # -- conveniences ------------------------------------------------------------------------------
    async def run_agent(
        self,
        message: str,
        *,
        session_key: str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        on_accepted: Callable[[dict[str, Any]], None] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"message": message, "idempotencyKey": idempotency_key or str(uuid.uuid4())}
        if session_key:
            params["sessionKey"] = session_key
        if timeout is not None:
            params["timeout"] = timeout
        params.update(extra)
        return await self.call_final("agent", params, on_accepted=on_accepted)

    async def wait(self, run_id: str, timeout_ms: int = 30_000) -> dict[str, Any]:
        return await self.call("agent.wait", {"runId": run_id, "timeoutMs": timeout_ms})

    async def abort(self, run_id: str) -> dict[str, Any]:
        return await self.call("agent.abort", {"runId": run_id})

    async def spawn(self, session_key: str, task: str, **kw: Any) -> dict[str, Any]:
        return await self.call("sessions.spawn", {"sessionKey": session_key, "task": task, **kw})

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def subscribe(self, session_keys: list[str] | None = None, *, all_sessions: bool = False) -> None:
        await self.call("events.subscribe", {"sessionKeys": session_keys or [], "all": all_sessions})

    @contextlib.asynccontextmanager
    async def watch_run(self, run_id: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """Collect this run's events (of runs this connection started or subscribed to)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_MAX)
        self._run_queues[run_id] = queue
        try:
            yield queue
        finally:
            self._run_queues.pop(run_id, None)

    async def stream(self, run_id: str, *, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield the `agent` events of a run until its lifecycle ends."""
        async with self.watch_run(run_id) as queue:
            while True:
                frame = await asyncio.wait_for(queue.get(), timeout)
                yield frame
                payload = frame.get("payload", {})
                if (
                    frame.get("event") == "agent"
                    and payload.get("stream") == "lifecycle"
                    and payload.get("data", {}).get("phase") in ("end", "error")
                    and not payload.get("data", {}).get("willRetry")
                ):
                    return
