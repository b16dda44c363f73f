"""An async client for the clawgate (and OpenClaw) gateway protocol.

    async with Client("ws://127.0.0.1:18789/", token="...") as c:
        final = await c.run_agent("summarise ticket 42", idempotency_key="ticket-42")
        print(final["result"]["payloads"][0]["text"])

        async for event in c.stream_agent("tell me more", idempotency_key="ticket-42b"):
            print(event["payload"]["stream"], event["payload"]["data"])

`call` sends one request and returns its (first) response payload or raises
`ClientError` carrying the wire error (`code`, `message`, `details`,
`retryable`, `retry_after_ms`). A dropped connection fails every request in
flight with `ConnectionLost` (a retryable `ClientError`); the next call
reconnects, with exponential backoff, so a client outlives a gateway restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection

from clawgate import __version__
from clawgate.protocol.constants import INTERNAL, INVALID_REQUEST

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

EVENT_QUEUE_MAX = 10_000
# Recent runs whose events are kept so `stream(run_id)` can replay what arrived before it was called.
RECENT_RUNS_MAX = 256
RECENT_EVENTS_PER_RUN_MAX = 1024


class ClientError(Exception):
    """An error answer from the gateway (or a client-side transport failure).

    `code` is the wire code (`INVALID_REQUEST`, `UNAUTHORIZED`, `FORBIDDEN`,
    `NOT_FOUND`, `UNAVAILABLE`, `AGENT_TIMEOUT`, `INTERNAL`, or the client-side
    `CONNECTION_LOST`); `retryable` and `retry_after_ms` say whether and when to
    try again.
    """

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
        """Build from a response's `error` object; a lost connection keeps its own type."""
        code = str(error.get("code", INTERNAL))
        message = str(error.get("message", ""))
        if code == ConnectionLost.CODE:
            return ConnectionLost(message)
        return cls(
            code,
            message,
            details=error.get("details"),
            retryable=bool(error.get("retryable", False)),
            retry_after_ms=error.get("retryAfterMs"),
        )


class ConnectionLost(ClientError):
    """The connection dropped (or could not be opened) before the answer arrived.

    Whether the request reached the gateway is unknown: retry only what is
    idempotent (`agent` with the same `idempotencyKey` joins the same run).
    """

    CODE = "CONNECTION_LOST"

    def __init__(self, message: str = "connection lost") -> None:
        super().__init__(self.CODE, message, retryable=True, retry_after_ms=200)


class _Pending:
    __slots__ = ("expect", "queue")

    def __init__(self, expect: int) -> None:
        self.expect = expect  # number of responses this request gets (agent: 2)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()


def _is_run_end(frame: dict[str, Any]) -> bool:
    payload = frame.get("payload") or {}
    data = payload.get("data") or {}
    return (
        frame.get("event") == "agent"
        and payload.get("stream") == "lifecycle"
        and data.get("phase") in ("end", "error")
        and not data.get("willRetry")
    )


class Client:
    """One WebSocket connection to a gateway, multiplexing any number of concurrent requests.

    Args:
        url: the gateway's WebSocket URL.
        token: the gateway token, when it has one.
        scopes: scopes to ask for (default read + write).
        max_reconnect_attempts: how many times `connect()` retries (with exponential
            backoff from 0.1 s up to 5 s) before raising `ConnectionLost`; 0 fails fast.
        keep_events: queue every event on `events` and keep recent runs' events for
            `stream()` replay. High-volume callers that only want final answers
            (batch, benchmarks) turn it off to save work.
        compression: offer permessage-deflate (off by default: it costs both ends CPU
            for little gain on the small frames of this protocol).
    """

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
        keep_events: bool = True,
        compression: bool = False,
    ) -> None:
        self.url = url
        self.token = token
        self.scopes = scopes or ["operator.read", "operator.write"]
        self.client_id = client_id
        self.open_timeout = open_timeout
        self.max_reconnect_attempts = max_reconnect_attempts
        self.max_size = max_size
        self.keep_events = keep_events
        self.compression = compression
        self.hello: dict[str, Any] = {}
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._run_queues: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}
        self._recent: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_MAX)
        self.events_dropped = 0
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self.connects = 0
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
        """Open the connection and handshake (no-op when connected); returns `hello-ok`.

        Retries refused connections and retryable handshake errors with
        exponential backoff; raises `ConnectionLost` when the gateway stays
        unreachable, or the handshake's `ClientError` (e.g. `UNAUTHORIZED`).
        """
        if self._closed:
            raise ConnectionLost("client closed")
        async with self._connect_lock:
            if self.connected:
                return self.hello
            delay = 0.1
            for attempt in range(self.max_reconnect_attempts + 1):
                try:
                    hello = await self._open()
                except ClientError as exc:
                    if not exc.retryable or attempt >= self.max_reconnect_attempts:
                        raise
                except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                    if attempt >= self.max_reconnect_attempts:
                        raise ConnectionLost(f"cannot connect to {self.url}: {exc}") from exc
                else:
                    if self.connects:
                        self.reconnects += 1
                    self.connects += 1
                    return hello
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            raise ConnectionLost(f"cannot connect to {self.url}")

    async def _open(self) -> dict[str, Any]:
        ws = await websockets.connect(
            self.url,
            open_timeout=self.open_timeout,
            max_size=self.max_size,
            ping_interval=None,
            close_timeout=2,
            # permessage-deflate cost the gateway ~6% of its CPU in the throughput benchmark, for
            # small JSON frames that mostly travel over loopback or a LAN.
            compression="deflate" if self.compression else None,
        )
        try:
            challenge = _decoder.decode(await asyncio.wait_for(ws.recv(), self.open_timeout))
            if challenge.get("event") != "connect.challenge":
                raise ClientError(INVALID_REQUEST, "expected connect.challenge")
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
        """Close for good: requests in flight fail with `ConnectionLost`, later calls too."""
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
                try:
                    frame = _decoder.decode(raw)
                except msgspec.DecodeError:
                    continue  # a gateway never sends this; dropping it beats killing the connection
                if not isinstance(frame, dict):
                    continue
                kind = frame.get("type")
                if kind == "res":
                    pending = self._pending.get(frame.get("id"))  # type: ignore[arg-type]
                    if pending is not None:
                        pending.queue.put_nowait(frame)
                elif kind == "event":
                    self._on_event(frame)
        except (websockets.exceptions.ConnectionClosed, OSError):
            pass
        finally:
            # No await between these two lines and the task ending, so a reconnect (which
            # waits for this task to be done) never sees its new requests failed here.
            if self._ws is ws:
                self._ws = None
            self._fail_pending(ConnectionLost())

    def _on_event(self, frame: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(frame)
        payload = frame.get("payload")
        run_id = payload.get("runId") if isinstance(payload, dict) else None
        if run_id is not None:
            for queue in self._run_queues.get(run_id, ()):
                queue.put_nowait(frame)
            if self.keep_events and frame.get("event") == "agent":
                self._remember(run_id, frame)
        if not self.keep_events:
            return
        try:
            self.events.put_nowait(frame)
        except asyncio.QueueFull:
            self.events_dropped += 1
            with contextlib.suppress(asyncio.QueueEmpty):
                self.events.get_nowait()
            self.events.put_nowait(frame)

    def _remember(self, run_id: str, frame: dict[str, Any]) -> None:
        frames = self._recent.get(run_id)
        if frames is None:
            frames = self._recent[run_id] = []
            while len(self._recent) > RECENT_RUNS_MAX:
                self._recent.popitem(last=False)
        if len(frames) < RECENT_EVENTS_PER_RUN_MAX:
            frames.append(frame)

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
        # Two tries: a send that fails because the socket was already closed never reached the
        # gateway, so reconnecting and sending again is safe for any method.
        for attempt in (1, 2):
            if self._closed:
                raise ConnectionLost("client closed")
            if not self.connected:
                await self.connect()
            ws = self._ws
            assert ws is not None
            req_id = f"r{next(self._ids)}"
            pending = _Pending(expect)
            self._pending[req_id] = pending
            try:
                await ws.send(
                    _encoder.encode(
                        {"type": "req", "id": req_id, "method": method, "params": params}
                    ).decode()
                )
            except websockets.exceptions.ConnectionClosed as exc:
                self._pending.pop(req_id, None)
                if self._ws is ws:
                    self._ws = None
                if attempt == 2:
                    raise ConnectionLost(str(exc)) from exc
                continue
            return req_id, pending
        raise AssertionError("unreachable")

    @staticmethod
    def _unwrap(frame: dict[str, Any]) -> dict[str, Any]:
        if frame.get("ok"):
            payload = frame.get("payload")
            return payload if isinstance(payload, dict) else {"value": payload}
        raise ClientError.from_wire(frame.get("error") or {})

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request; return its response payload or raise `ClientError`."""
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
        """A request answered twice (accepted, then final): returns the final payload.

        `on_accepted` is called with the first (`status: "accepted"`) payload.
        `timeout` bounds each of the two waits.
        """
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
    @staticmethod
    def _agent_params(
        message: str,
        session_key: str | None,
        idempotency_key: str | None,
        timeout: float | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"message": message, "idempotencyKey": idempotency_key or str(uuid.uuid4())}
        if session_key:
            params["sessionKey"] = session_key
        if timeout is not None:
            params["timeout"] = timeout
        params.update(extra)
        return params

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
        """Run `agent` and return its final payload (`{runId, status, summary, result, error?}`).

        The run id is the idempotency key (a random one when not given); sending
        the same key again joins the same run instead of starting another.
        `timeout` is the run's timeout in seconds (enforced by the gateway).
        """
        params = self._agent_params(message, session_key, idempotency_key, timeout, extra)
        return await self.call_final("agent", params, on_accepted=on_accepted)

    async def stream_agent(
        self,
        message: str,
        *,
        session_key: str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        **extra: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Start an `agent` run and yield its `agent` event frames until its lifecycle ends.

        The watch is registered before the request goes out, so no event is missed.
        A request error (e.g. `UNAVAILABLE`) is raised from the iteration.
        """
        params = self._agent_params(message, session_key, idempotency_key, timeout, extra)
        run_id = params["idempotencyKey"]
        async with self.watch_run(run_id) as queue:
            task = asyncio.create_task(self.call_final("agent", params))
            try:
                while True:
                    if task.done():
                        # The gateway sends a run's events before its final answer, so once the
                        # answer is in, every event is already queued (none for a deduplicated run).
                        while not queue.empty():
                            frame = queue.get_nowait()
                            if frame.get("event") == "agent":
                                yield frame
                                if _is_run_end(frame):
                                    return
                        task.result()  # raises the request's error
                        return
                    get = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                    if get not in done:
                        get.cancel()
                        continue
                    frame = get.result()
                    if frame.get("event") != "agent":
                        continue
                    yield frame
                    if _is_run_end(frame):
                        return
            finally:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ClientError):
                    await task

    async def wait(self, run_id: str, timeout_ms: int = 30_000) -> dict[str, Any]:
        """`agent.wait`: `{runId, status, startedAt?, endedAt?, error?}`.

        `status: "timeout"` without `endedAt` means the wait ended while the run goes on.
        Raises `ClientError` with code `NOT_FOUND` for an unknown or expired run.
        """
        return await self.call("agent.wait", {"runId": run_id, "timeoutMs": timeout_ms})

    async def abort(self, run_id: str) -> dict[str, Any]:
        """`agent.abort`: `{runId, aborted}`."""
        return await self.call("agent.abort", {"runId": run_id})

    async def spawn(self, session_key: str, task: str, **kw: Any) -> dict[str, Any]:
        """`sessions.spawn` on behalf of requester `session_key`: `{status, runId, childSessionKey}`.

        Keyword arguments are wire params (`mode`, `cleanup`, `label`, `idempotencyKey`, ...).
        """
        return await self.call("sessions.spawn", {"sessionKey": session_key, "task": task, **kw})

    async def status(self) -> dict[str, Any]:
        """The gateway's `status` (runs, connections, memory, every bounded structure's size)."""
        return await self.call("status")

    async def subscribe(self, session_keys: list[str] | None = None, *, all_sessions: bool = False) -> None:
        """`events.subscribe`: receive events of runs in these sessions (or of all sessions)."""
        await self.call("events.subscribe", {"sessionKeys": session_keys or [], "all": all_sessions})

    @contextlib.asynccontextmanager
    async def watch_run(self, run_id: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """Collect this run's event frames (`agent` and `chat`) while the context is open.

        Only events this connection receives: runs it started, and sessions it subscribed to.
        """
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_MAX)
        queues = self._run_queues.setdefault(run_id, [])
        queues.append(queue)
        try:
            yield queue
        finally:
            queues.remove(queue)
            if not queues:
                self._run_queues.pop(run_id, None)

    async def stream(
        self, run_id: str, *, session_key: str | None = None, timeout: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the `agent` event frames of a run until its lifecycle ends.

        Events of a recent run this connection already received are replayed
        first, so `stream(run_id)` after `agent` was accepted misses nothing.
        For a run started elsewhere, pass its `session_key`: the connection
        subscribes to that session first. `timeout` bounds the wait for each
        event (`TimeoutError`).
        """
        if session_key is not None:
            await self.subscribe([session_key])
        async with self.watch_run(run_id) as queue:
            # The snapshot is taken right after registering, with no await in between: a frame is
            # either in the snapshot or arrives on the queue (where its seq identifies a repeat).
            snapshot = list(self._recent.get(run_id, ()))
            replayed = {f["payload"].get("seq") for f in snapshot}
            for frame in snapshot:
                yield frame
                if _is_run_end(frame):
                    return
            while True:
                frame = await asyncio.wait_for(queue.get(), timeout)
                if frame.get("event") != "agent":
                    continue
                if frame["payload"].get("seq") in replayed:
                    continue
                yield frame
                if _is_run_end(frame):
                    return
