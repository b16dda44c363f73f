"""How much of a transcript its bounds keep (pure; the stores trim with it, retention decides when)."""

from __future__ import annotations

from collections.abc import Sequence


def transcript_keep(sizes_newest_first: Sequence[int], max_messages: int, max_bytes: int) -> int:
    """How many of the newest messages a transcript keeps (`sizes` in bytes, newest first).

    The newest message is always kept, even when it alone is over `max_bytes`: a
    conversation never loses its last turn, and one message is bounded by the
    payload limit and the provider's answer anyway.
    """
    kept = 0
    total = 0
    for size in sizes_newest_first:
        if kept >= max_messages:
            break
        if kept >= 1 and total + size > max_bytes:
            break
        kept += 1
        total += size
    return kept
