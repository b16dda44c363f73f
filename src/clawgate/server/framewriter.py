"""Send queued text frames to a WebSocket, several per transport write when the server allows it.

A run sends its client about seven frames (accepted, lifecycle start, deltas, end,
final). Through ASGI each is one `send` call through Starlette's wrappers and one
`transport.write` (a `send(2)` system call); in the throughput benchmark that was a
fifth of the gateway's main-thread CPU. On uvicorn's sans-I/O WebSocket protocol
(the one `serve.py` configures) the writer instead frames every queued message
with the protocol's own `websockets` state machine and hands the bytes to the
transport in one write: the same frames on the wire, in the same order, with the
same flow control (it waits while the transport is paused, as uvicorn's `send`
does). Frames travel as the UTF-8 bytes they were encoded to, never decoded and
re-encoded on the way.

Any other server (or a protocol object without the expected attributes) gets the
plain ASGI path, one `websocket.send` per frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

SendText = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Protocol attributes the batched path relies on (uvicorn's WebSocketsSansIOProtocol).
_NEEDED = ("conn", "transport", "writable", "disconnected", "close_sent", "handshake_complete")
_SANSIO_CLASS = "WebSocketsSansIOProtocol"


class FrameWriter:
    """Writes lists of UTF-8 text frames; `batched` says whether one write carries them all."""

    __slots__ = ("_protocol", "_send", "batched")

    def __init__(self, send: SendText, raw_send: object | None) -> None:
        self._send = send
        protocol = getattr(raw_send, "__self__", None)
        self.batched = type(protocol).__name__ == _SANSIO_CLASS and all(
            hasattr(protocol, name) for name in _NEEDED
        )
        self._protocol: Any = protocol if self.batched else None

    async def write(self, frames: list[bytes]) -> None:
        """Send `frames` in order. Raises ConnectionError when the peer is gone."""
        protocol = self._protocol
        if protocol is None:
            send = self._send
            for frame in frames:
                await send({"type": "websocket.send", "text": frame.decode()})
            return
        await protocol.writable.wait()
        if protocol.disconnected or not protocol.handshake_complete:
            raise ConnectionError("websocket disconnected")
        if protocol.close_sent:
            return  # uvicorn drops sends after a close the same way
        conn = protocol.conn
        try:
            for frame in frames:
                conn.send_text(frame)
        except Exception as exc:  # websockets' InvalidState: the connection is closing
            raise ConnectionError("websocket closing") from exc
        protocol.transport.write(b"".join(conn.data_to_send()))
