"""Every accepted socket, counted from accept to close (pure: no sockets, no loop).

The WebSocket-level limits (`max_connections`, `max_pending_handshakes`) only see
sockets that reached the app; a peer that opens sockets and never finishes its
HTTP request head holds file descriptors without ever being counted. This
ledger counts each socket the moment it is accepted:

- at most `max_sockets` open at once (the connection limits plus room for the
  sockets they refuse gracefully): over it, a new socket is dropped at once, so
  file descriptors cannot run out;
- at most `max_pending_per_addr` sockets of one address still before a completed
  `connect` (HTTP head included): one host cannot take every pending slot;
- `pending` (all addresses) is what the WebSocket-level `max_pending_handshakes`
  check reads, so idle sockets that never sent a head count too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from clawgate.settings import Settings

Phase = Literal["head", "handshake", "http", "open", "closed"]
# Phases in which a socket has not proved anything yet.
PENDING: frozenset[Phase] = frozenset({"head", "handshake"})


@dataclass(slots=True, eq=False)
class Slot:
    addr: str
    phase: Phase = "head"


class SocketLedger:
    def __init__(self, *, max_sockets: int, max_pending_per_addr: int) -> None:
        self.max_sockets = max_sockets
        self.max_pending_per_addr = max_pending_per_addr
        self.open = 0
        self.pending = 0
        self._pending_by_addr: dict[str, int] = {}
        self.refused_total = 0  # dropped at accept (over max_sockets)
        self.refused_per_addr = 0  # dropped at accept (over max_pending_per_addr)
        self.header_timeouts = 0
        self.ping_floods = 0

    def admit(self, addr: str) -> Slot | None:
        """A slot for a socket just accepted from `addr`, or None: drop it now."""
        if self.open >= self.max_sockets:
            self.refused_total += 1
            return None
        if self._pending_by_addr.get(addr, 0) >= self.max_pending_per_addr:
            self.refused_per_addr += 1
            return None
        self.open += 1
        slot = Slot(addr)
        self._add_pending(addr, 1)
        return slot

    def move(self, slot: Slot, phase: Phase) -> None:
        if slot.phase == "closed":
            return
        was, now = slot.phase in PENDING, phase in PENDING
        slot.phase = phase
        if was != now:
            self._add_pending(slot.addr, 1 if now else -1)

    def release(self, slot: Slot) -> None:
        if slot.phase == "closed":  # a second release must not count twice
            return
        self.open -= 1
        if slot.phase in PENDING:
            self._add_pending(slot.addr, -1)
        slot.phase = "closed"

    def addresses(self) -> int:
        """Addresses with a pending socket (the size of the per-address map)."""
        return len(self._pending_by_addr)

    def pending_from(self, addr: str) -> int:
        return self._pending_by_addr.get(addr, 0)

    def _add_pending(self, addr: str, delta: int) -> None:
        self.pending += delta
        count = self._pending_by_addr.get(addr, 0) + delta
        if count > 0:
            self._pending_by_addr[addr] = count
        else:
            self._pending_by_addr.pop(addr, None)


def max_sockets(settings: Settings) -> int:
    """Open sockets at most: the connections, plus as many again as may wait for a handshake
    (they are refused gracefully, with a close code, while under this)."""
    return settings.max_connections + settings.max_pending_handshakes
