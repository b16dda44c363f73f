"""The per-run bound on provider output (`max_reply_bytes`), pure: no I/O, no clock.

A reply longer than the bound is cut at a UTF-8 character boundary and ends with
a visible marker, so a reader (a person, a client, the transcript) sees that text
is missing instead of a silently shorter answer. Everything kept in memory for a
run (events, the result cache, the transcript) is then bounded by the cap plus
the marker, whatever the provider sends.
"""

from __future__ import annotations

TRUNCATED_MARKER = "\n[reply truncated: provider output exceeded maxReplyBytes]"


class ReplyCap:
    __slots__ = ("max_bytes", "truncated", "used")

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.truncated = False

    def take(self, delta: str) -> str:
        """What of `delta` may be kept (with the marker appended once the cap is hit)."""
        if self.truncated or not delta:
            return ""
        if self.max_bytes is None:
            return delta
        encoded = delta.encode("utf-8", "surrogatepass")
        room = self.max_bytes - self.used
        if len(encoded) <= room:
            self.used += len(encoded)
            return delta
        # Cut at a byte offset, then drop a partial trailing character.
        kept = encoded[: max(room, 0)].decode("utf-8", "ignore")
        self.used = self.max_bytes
        self.truncated = True
        return kept + TRUNCATED_MARKER

    def rewind(self, used: int) -> None:
        """Forget what a failed (retried) attempt took."""
        self.used = used
        self.truncated = False
