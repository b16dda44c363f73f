"""`chat.history` pages: the newest messages that fit in one frame under `maxPayload`.

A transcript may hold far more than one frame can carry (1,000 messages of a
megabyte each), so a page is filled newest first until either `limit` messages
or the byte budget is reached; the client follows `nextCursor` for older ones.
The store is read in small batches with each message clipped at the remaining
budget, so even a page request costs bounded memory, whatever the transcript holds.

A message too large for a page of its own is sent cut (at a UTF-8 boundary) with
`HISTORY_CLIPPED_MARKER` and `"truncated": true` on the message. The sizing is
pure (`item_for`, `clip_to_fit`) and exact: it measures the JSON that will be sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from clawgate.sessions.view import transcript_identity
from clawgate.store.base import Store
from clawgate.store.records import TranscriptMessage

HISTORY_CLIPPED_MARKER = "\n[message truncated: larger than one chat.history page]"
BATCH = 16
_encoder = msgspec.json.Encoder()


@dataclass
class HistoryPage:
    messages: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    next_cursor: str | None = None
    truncated: bool = False


def item_for(msg: TranscriptMessage, content: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "role": msg.role,
        "content": msg.content if content is None else content,
        "ts": int(msg.ts * 1000),
    }
    if msg.run_id:
        item["runId"] = msg.run_id
    identity = transcript_identity(msg)
    if identity is not None:
        item["__openclaw"] = identity  # OpenClaw's clients match reloaded messages by it
    return item


def encoded_size(item: dict[str, Any]) -> int:
    return len(_encoder.encode(item))


def clip_to_fit(msg: TranscriptMessage, budget: int) -> dict[str, Any] | None:
    """The message cut (with the marker) so that its JSON takes at most `budget` bytes; None if
    not even the marker fits."""
    data = msg.content.encode("utf-8", "surrogatepass")
    keep = len(data)
    while True:
        content = data[:keep].decode("utf-8", "ignore") + HISTORY_CLIPPED_MARKER
        item = item_for(msg, content)
        item["truncated"] = True
        excess = encoded_size(item) - budget
        if excess <= 0:
            return item
        if keep == 0:
            return None
        # JSON escaping may make a byte cost up to 6 bytes: shrinking by the excess converges.
        keep = max(0, keep - excess)


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not cursor.isdigit() or len(cursor) > 19:
        raise ValueError("not a chat.history cursor")
    return int(cursor)


async def read_page(
    store: Store, session_key: str, *, before: int | None, limit: int, budget: int
) -> HistoryPage:
    """The newest `limit` messages before the cursor position whose JSON fits in `budget` bytes."""
    page = HistoryPage()
    newest_first: list[dict[str, Any]] = []
    used = 2  # the brackets of the list
    position = before
    while True:
        want = min(BATCH, limit - len(newest_first)) + 1  # one more: are there older ones?
        batch = await store.history_before(session_key, position, want, max(budget - used, 0))
        for pos, msg in batch:
            if len(newest_first) >= limit:
                return _finish(page, newest_first, position)  # `msg` exists: there is more
            comma = 1 if newest_first else 0
            item = item_for(msg)
            size = encoded_size(item)
            # A message cut by the store (longer than the room left) never fits here.
            if comma + size <= budget - used:
                newest_first.append(item)
                used += comma + size
                position = pos
                continue
            page.truncated = True
            if newest_first:
                return _finish(page, newest_first, position)  # it starts the next page
            clipped = clip_to_fit(msg, budget - used)
            if clipped is None:  # not even the marker fits: skip the message
                return _finish(page, newest_first, pos)
            newest_first.append(clipped)
            used += encoded_size(clipped)
            position = pos
        if len(batch) < want:
            return _finish(page, newest_first, None)  # the store has nothing older


def _finish(page: HistoryPage, newest_first: list[dict[str, Any]], older_from: int | None) -> HistoryPage:
    page.messages = newest_first[::-1]
    page.next_cursor = None if older_from is None else str(older_from)
    return page
