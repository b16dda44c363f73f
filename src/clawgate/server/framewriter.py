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

import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from websockets.protocol import SERVER, State

SendText = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Protocol attributes the batched path relies on (uvicorn's WebSocketsSansIOProtocol).
_NEEDED = ("conn", "transport", "writable", "disconnected", "close_sent", "handshake_complete")
_SANSIO_CLASS = "WebSocketsSansIOProtocol"
_FIN_TEXT = 0x81  # FIN bit + opcode 1 (text)


def text_frame(data: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (RFC 6455 section 5.2), as a server sends it.

    The same bytes `websockets` produces for `send_text` without extensions, built
    without its per-frame object, checks and buffer.
    """
    length = len(data)
    if length < 126:
        head = struct.pack("!BB", _FIN_TEXT, length)
    elif length < 65536:
        head = struct.pack("!BBH", _FIN_TEXT, 126, length)
    else:
        head = struct.pack("!BBQ", _FIN_TEXT, 127, length)
    return head + data


class FrameWriter:
    """Writes lists of UTF-8 text frames; `batched` says whether one write carries them all."""

    __slots__ = ("_protocol", "_send", "batched")

    def __init__(self, send: SendText, raw_send: object | None) -> None:
        self._send = send
        protocol = getattr(raw_send, "__self__", None)
        # uvicorn's protocol or a subclass of it (the gateway's own, server/protocols.py), named
        # rather than imported so this module does not load uvicorn.
        self.batched = any(cls.__name__ == _SANSIO_CLASS for cls in type(protocol).__mro__) and all(
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
        if (
            conn.state is State.OPEN
            and conn.side is SERVER
            and not conn.extensions
            and not conn.expect_continuation_frame
        ):
            # What `send_text` would queue, framed here: anything the protocol queued itself
            # (a pong) goes first, as it would have.
            out = conn.data_to_send()
            out.extend(text_frame(frame) for frame in frames)
            protocol.transport.write(b"".join(out))
            return
        try:
            for frame in frames:
                conn.send_text(frame)
        except Exception as exc:  # websockets' InvalidState: the connection is closing
            raise ConnectionError("websocket closing") from exc
        protocol.transport.write(b"".join(conn.data_to_send()))
