"""A run's lifecycle decisions, as pure functions of a record and the time (no I/O, no loop).

The run service (runs/service.py) does the effects: it asks here what a run's end looks
like, whether a run may start, what a cancellation ends it with and which events tell
its end, then writes, emits and notifies through its one completion path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from clawgate.store.records import RunRecord, TranscriptMessage

INTERRUPTED = "interrupted by gateway restart"
NOT_RESTORED = "not re-queued after restart: maxTrackedRuns reached"


def end(
    rec: RunRecord,
    status: str,
    error: str | None,
    text: str | None,
    now: float,
    *,
    measure: bool = True,
) -> RunRecord:
    """The record `rec` ends as: a new record, `rec` is left as it was.

    `measure`: set `duration_ms` from `started_at` (the restore after a restart does not:
    the time the gateway was down is no part of the run).
    """
    ended = msgspec.structs.replace(rec, status=status, ended_at=now, error=error, result_text=text)
    if measure and rec.started_at is not None:
        ended.duration_ms = int((now - rec.started_at) * 1000)
    return ended


# The fields `end` sets: the run service copies them into the record it tracks, which others
# (the accepting request, the results map) hold too.
END_FIELDS = ("status", "ended_at", "error", "result_text", "duration_ms")


def can_start(rec: RunRecord, cancel_reason: str | None, draining: bool) -> bool:
    """A run that ended, was asked to end (abort, timeout: its end is being written in
    another task) or meets a draining gateway is not started."""
    return not (rec.is_final or cancel_reason is not None or draining)


def cancel_status(reason: str) -> str:
    """The status a cancelled run ends with: "aborted" | "timeout", "error" on shutdown."""
    return "error" if reason == "shutdown" else reason


def cancel_message(reason: str) -> str:
    if reason == "timeout":
        return "run timed out"
    if reason == "shutdown":
        return "gateway shutting down"
    return "aborted"


def reply_before_end(fenced: bool, ended: RunRecord) -> TranscriptMessage | None:
    """The reply to append to the transcript before the end is written, if any.

    Unfenced: the ended record's reply (`RunRecord.reply_message`: an ok run with a reply
    text), since the store's writer is FIFO, so the reply is durable in the same (or an
    earlier) transaction as the end. A fenced end (a run from the shared Redis queue) may be
    refused, so its reply is written by the end's own script (RedisStore.end_run), never
    before it.
    """
    return None if fenced else ended.reply_message()


@dataclass(frozen=True)
class EndEvents:
    """What tells clients a run ended: one `agent` lifecycle event and one `chat` event."""

    lifecycle: dict[str, Any]
    chat_state: str  # "final" | "aborted" | "error"
    chat: dict[str, Any]  # the chat event's fields, except the final message (built with the text)


def end_events(rec: RunRecord, now: float) -> EndEvents:
    ended_ms = int(now * 1000)
    if rec.status == "ok" or rec.status == "aborted":
        data: dict[str, Any] = {"phase": "end", "endedAt": ended_ms}
        if rec.status == "aborted":
            data["aborted"] = True
    else:
        data = {"phase": "error", "endedAt": ended_ms, "error": rec.error or rec.status}
    if rec.status == "ok":
        return EndEvents(data, "final", {})
    if rec.status == "aborted":
        return EndEvents(data, "aborted", {})
    return EndEvents(data, "error", {"errorMessage": rec.error or rec.status})
