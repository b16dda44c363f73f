"""The registry's decisions, as pure functions of a record and the time (tested without a loop).

These encode DESIGN.md section 1:
  rule 1  a finished session-mode record dies `subagent_session_ttl_s` after its
          cleanup *completed*, not after it ended, so deferred cleanup is never cut short;
  rule 7  the ended notification is reported once; the sweep reports `swept` only
          for a record that has reported nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from clawgate.store.records import SubagentRecord


@dataclass(frozen=True)
class Ttls:
    session_ttl_s: float
    archive_after_s: float


def expiry_after_cleanup(rec: SubagentRecord, ttls: Ttls) -> float:
    """When the sweep may remove a record whose cleanup has completed."""
    assert rec.cleanup_completed_at is not None, "expiry is only set once cleanup completed"
    if rec.mode == "session":
        return rec.cleanup_completed_at + ttls.session_ttl_s
    ended = rec.ended_at if rec.ended_at is not None else rec.cleanup_completed_at
    # Archive time counts from the end, but never before cleanup has completed.
    return max(ended + ttls.archive_after_s, rec.cleanup_completed_at)


def cleanup_reason(rec: SubagentRecord) -> str:
    return "deleted" if rec.cleanup == "delete" else "completed"


def sweep_reason(rec: SubagentRecord) -> str | None:
    """What the TTL sweep reports: `swept` if nothing was reported yet, else nothing (silent)."""
    return "swept" if rec.ended_reason is None else None


def sweep_deletes_child_session(rec: SubagentRecord) -> bool:
    """Run-mode archive removes the child session; session-mode children stay for follow-ups."""
    return rec.mode == "run" and rec.cleanup == "keep"


def sweep_removes_attachments(rec: SubagentRecord, retain_on_keep: bool) -> bool:
    """Rule 8: a swept run's attachments stay only when kept and `retainAttachmentsOnKeep` is set."""
    return not (rec.cleanup == "keep" and retain_on_keep)


def freeze(text: str | None, max_bytes: int) -> str | None:
    """The frozen result, capped at `max_bytes` of UTF-8 without splitting a character."""
    if text is None:
        return None
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


def announce_delay(attempt: int, delays: list[float]) -> float:
    """Delay before retry number `attempt` (1-based): 1, 2, 4, 8 s, then the last one again."""
    if not delays:
        return 1.0
    # Clamped at both ends: attempt 0 (or less) must not wrap around to the last delay.
    return delays[min(max(attempt, 1), len(delays)) - 1]


def announce_text(rec: SubagentRecord) -> str:
    label = f" {rec.label!r}" if rec.label else ""
    head = f"[subagent{label} {rec.run_id} finished: {rec.outcome}]"
    if rec.outcome == "ok":
        return f"{head}\n{rec.frozen_result or ''}"
    return f"{head} {rec.error or ''}".rstrip()
