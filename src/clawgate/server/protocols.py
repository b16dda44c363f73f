"""uvicorn's HTTP (h11) and WebSocket (websockets-sansio) protocols with the gateway's socket guards.

uvicorn has no limit before the app sees a request: no read timeout for the
HTTP request head, no count of sockets that never send one, and a pong is
written for every ping whether or not the peer reads. These subclasses add:

- the socket ledger (`server/sockets.py`): every accepted socket is counted
  (and dropped at once when over a limit) until it closes, whatever protocol
  it speaks by then;
- `http_header_timeout_s`: a socket must deliver a complete request head in
  time, after accept and again after each keep-alive response, or it is dropped;
- pongs count against `max_buffered_bytes` while the peer is not reading (the
  transport has paused writing): a peer that pings and never reads is dropped
  instead of growing the process without bound.

Timers use the gateway's clock, so tests drive them with a fake one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from clawgate.server.sockets import Slot
from clawgate.state.clock import Timer

if TYPE_CHECKING:
    from clawgate.server.gateway import Gateway

SLOT_SCOPE_KEY = "clawgate.socket_slot"


def peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "?")


def guarded_protocols(gateway: Gateway) -> tuple[type[asyncio.Protocol], type[asyncio.Protocol]]:
    """The (http, ws) protocol classes uvicorn instantiates per socket, bound to `gateway`."""
    ledger = gateway.sockets
    clock = gateway.clock
    settings = gateway.settings
    slots: dict[int, Slot] = {}  # id(transport) -> slot, while the HTTP layer hands over to WS

    class GuardedH11Protocol(H11Protocol):
        _slot: Slot | None = None
        _head_timer: Timer | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            slot = ledger.admit(peer_address(transport))
            if slot is None:
                # Over a limit: drop it before anything is allocated for it.
                transport.abort()
                return
            self._slot = slot
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._slot is None:
                return  # refused at accept: nothing was set up
            self._cancel_head_timer()
            slots.pop(id(self.transport), None)
            ledger.release(self._slot)
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if (
                self._slot is not None
                and self._slot.phase == "head"
                and self.conn.their_state is not h11.IDLE
            ):
                # A complete request head arrived (a plain HTTP request): no longer pending.
                self._cancel_head_timer()
                ledger.move(self._slot, "http")

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            self._cancel_head_timer()
            if self._slot is not None:
                ledger.move(self._slot, "handshake")
                slots[id(self.transport)] = self._slot
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._slot is not None and not self.transport.is_closing():
                # Keep-alive: the next request head gets the same deadline as the first.
                ledger.move(self._slot, "head")
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = clock.call_later(settings.http_header_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._slot is not None and self._slot.phase == "head" and not self.transport.is_closing():
                ledger.header_timeouts += 1
                self.transport.abort()

    class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
        _slot: Slot | None = None
        _pong_backlog = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._slot = slots.pop(id(transport), None)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._slot is not None:
                ledger.release(self._slot)
            super().connection_lost(exc)

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            scope: Any = getattr(self, "scope", None)
            if scope is not None and self._slot is not None:
                # The app task has not run yet: it finds the slot in its scope (for `open`).
                scope[SLOT_SCOPE_KEY] = self._slot

        def resume_writing(self) -> None:
            super().resume_writing()
            self._pong_backlog = 0  # the peer is reading again

        def handle_ping(self) -> None:
            if self.writable.is_set():
                super().handle_ping()
                return
            # The transport stopped taking data (the peer does not read): every pong written
            # now stays in memory, so pongs count against the connection's buffer limit.
            pong = b"".join(self.conn.data_to_send())
            if self.transport.is_closing():
                return  # already dropped: the rest of this read is discarded
            self._pong_backlog += len(pong)
            if self._pong_backlog > settings.max_buffered_bytes:
                ledger.ping_floods += 1
                self.transport.abort()
                return
            self.transport.write(pong)

    return GuardedH11Protocol, GuardedWebSocketProtocol
