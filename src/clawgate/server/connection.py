"""One WebSocket connection: handshake, receive loop, dispatch, bounded send buffer.

The receive loop never awaits a handler: each request runs in its own task
(bounded per connection), so a long `agent.wait` does not block the socket.
Frames going out never await the socket either: they go into the bounded
`SendBuffer`, drained by one writer task; a client that stops reading is
disconnected when its buffer passes `max_buffered_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import TYPE_CHECKING, Any

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from clawgate.clip import clip
from clawgate.errors import ClawgateError, InvalidRequest, PayloadTooLarge, Unavailable, internal_error
from clawgate.ids import ConnId, SessionKey, new_conn_id
from clawgate.protocol.constants import CLOSE_POLICY, CLOSE_TOO_BIG
from clawgate.protocol.frames import decode_request, encode_error, encode_event, encode_response, probe_id
from clawgate.server.auth import Grant
from clawgate.server.framewriter import FrameWriter
from clawgate.server.origin import BROWSER_SCOPE_KEY
from clawgate.server.protocols import SLOT_SCOPE_KEY
from clawgate.server.ratelimit import TokenBucket
from clawgate.server.sendbuffer import SendBuffer
from clawgate.state.clock import Timer

if TYPE_CHECKING:
    from clawgate.server.gateway import Gateway

log = structlog.get_logger("clawgate.connection")

MAX_INFLIGHT = 1024
RAW_SEND_SCOPE_KEY = "clawgate.raw_send"
CLOSE_TASK_WAIT_S = 3.0  # a close is bounded by a 1 s flush and a 1 s close handshake
# At most this much goes into one transport write (the rest waits for the next one).
WRITE_BATCH_BYTES = 256 * 1024


class Connection:
    def __init__(self, gateway: Gateway, ws: WebSocket) -> None:
        self.gw = gateway
        self.ws = ws
        self.conn_id: ConnId = new_conn_id()
        self.grant: Grant | None = None
        self.client: dict[str, Any] = {}
        self.subscribed: set[SessionKey] = set()
        self.buffer = SendBuffer(gateway.settings.max_buffered_bytes)
        self.bucket = TokenBucket(
            gateway.settings.rate_limit_per_s, gateway.settings.rate_limit_burst, gateway.clock.monotonic()
        )
        self.inflight: set[asyncio.Task[None]] = set()
        self.nonce = str(uuid.uuid4())
        self.closed = False
        self._wake = asyncio.Event()
        # True while the writer waits on the socket: the peer has stopped taking data for now.
        self._sending = False
        self.frame_writer: FrameWriter | None = None  # made by the writer task
        self._writer: asyncio.Task[None] | None = None
        self._handshake_timer: Timer | None = None
        # Close tasks this connection started (at most two: an abort and a handshake timeout);
        # awaited before the gateway forgets the connection, so none outlives it.
        self._close_tasks: set[asyncio.Task[None]] = set()
        self.connected_at = gateway.clock.time()
        self.peer: str = ws.client.host if ws.client else ""
        # Set by the origin guard when an allowed browser page opened this socket.
        self.browser = bool(ws.scope.get(BROWSER_SCOPE_KEY))

    # -- outbound ---------------------------------------------------------------------------
    def send_frame(self, frame: bytes) -> None:
        """Queue a frame without awaiting the socket (the event bus calls this)."""
        if self.closed:
            return
        if not self.buffer.push(frame, len(frame), writer_blocked=self._sending):
            self.gw.slow_consumers += 1
            self.gw.peer_log.warning(
                self.peer, "slow consumer disconnected", conn=self.conn_id, limit=self.buffer.max_bytes
            )
            self._abort(CLOSE_POLICY, "slow consumer: send buffer over maxBufferedBytes")
            return
        self._wake.set()

    def respond(self, req_id: str, payload: Any) -> None:
        self.send_frame(encode_response(req_id, payload))

    def respond_error(self, req_id: str | None, exc: ClawgateError) -> None:
        self.send_frame(encode_error(req_id, exc.to_error_shape()))

    async def _write_loop(self) -> None:
        writer = self.frame_writer = FrameWriter(self.ws.send, self.ws.scope.get(RAW_SEND_SCOPE_KEY))
        buffer = self.buffer
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                # Everything queued since the last turn goes out together (one write on uvicorn).
                while frames := buffer.pop_many(WRITE_BATCH_BYTES):
                    self._sending = True
                    await writer.write([f if isinstance(f, bytes) else f.encode() for f in frames])
                    self._sending = False
        except (WebSocketDisconnect, OSError, RuntimeError):
            self.closed = True
        except Exception:  # uvicorn's ClientDisconnected and friends
            self.closed = True

    async def _flush(self, timeout_s: float = 1.0) -> None:
        """Give the writer a moment to send what is queued (before a deliberate close)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.buffer) and not self.closed and loop.time() < deadline:
            await asyncio.sleep(0.005)

    def _abort(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        task = self.gw.supervisor.spawn(self._close(code, reason), name="connection-close")
        self._close_tasks.add(task)

    async def _close(self, code: int, reason: str) -> None:
        if self._sending:
            # The writer is stuck on a socket the peer does not read: a close frame would queue
            # behind it forever, so drop the transport now.
            _abort_transport(self.ws)
            return
        try:
            await asyncio.wait_for(self.ws.close(code, reason), timeout=1.0)
        except Exception:
            # The peer is not reading, so even the close frame cannot go out: drop the transport.
            _abort_transport(self.ws)

    async def close(self, code: int, reason: str = "") -> None:
        await self._flush()
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        await self._close(code, reason)

    # -- lifecycle -------------------------------------------------------------------------------
    async def serve(self) -> None:
        gw = self.gw
        await self.ws.accept()
        # This connection's tasks are held by the gateway's supervisor (failures counted) and
        # ended by this connection (`_teardown`): it cancels and awaits them, as it always did.
        self._writer = gw.supervisor.spawn(self._write_loop(), name="connection-writer")
        self.send_frame(
            encode_event("connect.challenge", {"nonce": self.nonce, "ts": int(gw.clock.time() * 1000)})
        )
        self._handshake_timer = gw.clock.call_later(gw.settings.handshake_timeout_s, self._handshake_expired)
        try:
            await self._receive_loop()
        finally:
            await self._teardown()

    def _handshake_expired(self) -> None:
        if self.grant is None and not self.closed:
            self.respond_error(None, InvalidRequest("handshake timeout: no connect request"))
            task = self.gw.supervisor.spawn(
                self.close(CLOSE_POLICY, "handshake timeout"), name="connection-close"
            )
            self._close_tasks.add(task)

    async def _receive_loop(self) -> None:
        receive = self.ws.receive
        max_payload = self.gw.settings.max_payload_bytes
        while not self.closed:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
                if data is None:
                    continue
                if self.grant is None:
                    self.respond_error(None, InvalidRequest("binary frames are not supported"))
                    await self.close(CLOSE_POLICY, "handshake failed")
                    return
                self.respond_error(
                    probe_id(data), InvalidRequest("binary frames are not supported; send text")
                )
                continue
            try:
                frame = decode_request(data, max_payload)
            except PayloadTooLarge as exc:
                self.respond_error(None, exc)
                await self.close(CLOSE_TOO_BIG, "frame too large")
                return
            except InvalidRequest as exc:
                self.respond_error(probe_id(data), exc)
                if self.grant is None:
                    await self.close(CLOSE_POLICY, "handshake failed")
                    return
                continue
            if self.grant is None:
                if not await self._handshake(frame.id, frame.method, frame.params):
                    return
                continue
            wait = self.bucket.take(self.gw.clock.monotonic())
            if wait > 0:
                self.respond_error(
                    frame.id, Unavailable("rate limit exceeded", retry_after_ms=int(wait * 1000) + 1)
                )
                continue
            if len(self.inflight) >= MAX_INFLIGHT:
                self.respond_error(
                    frame.id,
                    Unavailable("too many requests in flight on this connection", retry_after_ms=100),
                )
                continue
            task = self.gw.supervisor.spawn(
                self.gw.dispatch(self, frame.id, frame.method, frame.params), name="connection-request"
            )
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def _handshake(self, req_id: str, method: str, params: Any) -> bool:
        try:
            if method != "connect":
                raise InvalidRequest(
                    f"first request must be connect, got {clip(method)!r}", details={"field": "method"}
                )
            hello = await self.gw.handshake(self, params)
        except ClawgateError as exc:
            # Logged without the presented credentials, clipped, and rate limited per peer.
            self.gw.peer_log.info(
                self.peer, "handshake refused", conn=self.conn_id, code=exc.code, reason=exc.message
            )
            self.respond_error(req_id, exc)
            await self.close(CLOSE_POLICY, "handshake failed")
            return False
        except Exception as exc:
            # A bug (e.g. in device verification) must not end the socket without an answer.
            self.gw.internal_errors += 1
            self.respond_error(
                req_id, internal_error(exc, log, "internal error in handshake", conn=self.conn_id)
            )
            await self.close(CLOSE_POLICY, "handshake failed")
            return False
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        slot = self.ws.scope.get(SLOT_SCOPE_KEY)
        if slot is not None:
            self.gw.sockets.move(slot, "open")  # no longer a pending socket of its address
        self.respond(req_id, hello)
        return True

    async def _teardown(self) -> None:
        self.closed = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._wake.set()
        for task in list(self.inflight):
            task.cancel()
        # Deferred `agent` answers and parked waits of this connection: nobody left to answer.
        self.gw.runs.drop_waiters(self.conn_id)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        await self._finish_close_tasks()
        self.gw.forget(self)

    async def _finish_close_tasks(self) -> None:
        """Let this connection's close tasks end (each is bounded); cancel what is left.

        So the gateway's background tasks never outnumber twice its connections: the
        bound `background_tasks` declares holds by construction.
        """
        pending = [t for t in self._close_tasks if not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=CLOSE_TASK_WAIT_S)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
        self._close_tasks.clear()


def _abort_transport(ws: WebSocket) -> None:
    """uvicorn does not expose the transport through ASGI; reach it through its bound `send`.

    Starlette wraps `send` before the endpoint sees it, so `app.RawSendMiddleware`
    keeps the server's own one in the scope.
    """
    raw_send = ws.scope.get(RAW_SEND_SCOPE_KEY, getattr(ws, "_send", None))
    protocol = getattr(raw_send, "__self__", None)
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()
