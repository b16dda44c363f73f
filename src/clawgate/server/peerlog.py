"""Log lines a peer can provoke, clipped and rate limited per peer address.

A client can make the gateway log (refused handshakes, refused origins) as fast
as it can send; without a limit it can fill the disk. Each (peer, event) pair
gets `max_lines` lines per window; the rest are counted, and one summary line
says how many were dropped when the window ends. The per-peer windows live in a
registered TTLMap, bounded in size and swept by maintenance.
"""

from __future__ import annotations

from typing import Any

import structlog

from clawgate.clip import clip
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap

log = structlog.get_logger("clawgate.peer")


class _Window:
    __slots__ = ("logged", "suppressed")

    def __init__(self) -> None:
        self.logged = 0
        self.suppressed = 0


class PeerLog:
    def __init__(
        self,
        clock: Clock,
        registry: StateRegistry,
        *,
        max_lines: int,
        window_s: float,
        max_peers: int = 10_000,
    ) -> None:
        self.max_lines = max_lines
        self.suppressed_total = 0
        self._windows: TTLMap[tuple[str, str], _Window] = TTLMap(
            "peer_log_windows", clock, ttl_s=window_s, max_size=max_peers, on_expire=self._closed
        )
        registry.register(self._windows)

    def _closed(self, key: tuple[str, str], window: _Window, why: str) -> None:
        if window.suppressed:
            log.warning("repeated log lines dropped", peer=key[0], line=key[1], dropped=window.suppressed)

    def allow(self, peer: str, event: str) -> bool:
        """Whether this line may be written now (counts it either way)."""
        key = (peer, event)
        window = self._windows.get(key)
        if window is None:
            window = _Window()
            self._windows.set(key, window)  # the window runs from the first line, never extended
        if window.logged < self.max_lines:
            window.logged += 1
            return True
        window.suppressed += 1
        self.suppressed_total += 1
        return False

    def info(self, peer: str, event: str, **fields: Any) -> None:
        if self.allow(peer, event):
            log.info(event, peer=peer, **_clipped(fields))

    def warning(self, peer: str, event: str, **fields: Any) -> None:
        if self.allow(peer, event):
            log.warning(event, peer=peer, **_clipped(fields))


def _clipped(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: clip(v) if isinstance(v, str) else v for k, v in fields.items()}
