"""A connection's bounded outbound buffer (pure: no awaits, no sockets).

Frames are queued here without awaiting the socket; a writer task drains it.
A client that stops reading is dropped (close 1008) rather than buffered
without end.

What counts as "unsent" follows OpenClaw, which checks the socket's
`bufferedAmount` (bytes the kernel has not taken) before each send. Node hands
a frame to the kernel synchronously; here a writer task does it one loop turn
later, so frames queued while the writer runs freely are only in transit, not
refused. The consumer is slow when the writer is stuck on a socket that stopped
taking data (`writer_blocked`) and more than `max_bytes` is already waiting:
then the buffer is dropped and stays refused. A hard ceiling bounds even a
burst produced while the writer was free, so memory per connection is bounded
whatever happens.
"""

from __future__ import annotations

from collections import deque

# Frames are the UTF-8 bytes the encoder produced (str is accepted too, and kept as given).
Frame = str | bytes

# A burst queued in one loop turn (e.g. a large reply fanned out as several events) may pass
# `max_bytes` while the socket is still taking data; this caps it anyway.
HARD_CEILING_FACTOR = 16
HARD_CEILING_MIN = 16 * 1024 * 1024


class SendBuffer:
    __slots__ = ("_frames", "hard_max_bytes", "max_bytes", "overflowed", "pending_bytes")

    def __init__(self, max_bytes: int, hard_max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.hard_max_bytes = (
            max(HARD_CEILING_FACTOR * max_bytes, HARD_CEILING_MIN)
            if hard_max_bytes is None
            else hard_max_bytes
        )
        self.pending_bytes = 0
        self.overflowed = False
        self._frames: deque[tuple[Frame, int]] = deque()

    def push(self, frame: Frame, size: int | None = None, *, writer_blocked: bool = True) -> bool:
        """Queue a frame of `size` bytes (default: its UTF-8 length).

        Returns False, marks the buffer overflowed and drops what was queued when
        the consumer is too slow (see the module docstring); once overflowed the
        buffer refuses everything.
        """
        if self.overflowed:
            return False
        if size is None:
            size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8", "surrogatepass"))
        if (writer_blocked and self.pending_bytes > self.max_bytes) or (
            self._frames and self.pending_bytes + size > self.hard_max_bytes
        ):
            self.overflowed = True
            self._frames.clear()
            self.pending_bytes = 0
            return False
        self._frames.append((frame, size))
        self.pending_bytes += size
        return True

    def pop(self) -> Frame | None:
        if not self._frames:
            return None
        frame, size = self._frames.popleft()
        self.pending_bytes -= size
        return frame

    def pop_many(self, max_bytes: int) -> list[Frame]:
        """Frames from the front, in order, up to `max_bytes` in all (at least one if any)."""
        frames = self._frames
        out: list[Frame] = []
        taken = 0
        while frames and (not out or taken + frames[0][1] <= max_bytes):
            frame, size = frames.popleft()
            out.append(frame)
            taken += size
        self.pending_bytes -= taken
        return out

    def __len__(self) -> int:
        return len(self._frames)
