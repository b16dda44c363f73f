"""A connection's bounded outbound buffer (pure: no awaits, no sockets).

Frames are queued here without awaiting the socket; a writer task drains it.
When the unsent bytes pass `max_bytes` the consumer is too slow and the
connection is dropped (close 1008) rather than buffered without end.
"""

from __future__ import annotations

from collections import deque


class SendBuffer:
    __slots__ = ("_frames", "max_bytes", "overflowed", "pending_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pending_bytes = 0
        self.overflowed = False
        self._frames: deque[str] = deque()

    def push(self, frame: str) -> bool:
        """Queue a frame. Returns False (and marks overflow) when the buffer would exceed its bound."""
        if self.overflowed:
            return False
        size = len(frame)
        if self.pending_bytes + size > self.max_bytes:
            self.overflowed = True
            self._frames.clear()
            self.pending_bytes = 0
            return False
        self._frames.append(frame)
        self.pending_bytes += size
        return True

    def pop(self) -> str | None:
        if not self._frames:
            return None
        frame = self._frames.popleft()
        self.pending_bytes -= len(frame)
        return frame

    def __len__(self) -> int:
        return len(self._frames)
