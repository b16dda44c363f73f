"""The registry's decisions, as pure functions of a record and the time (tested without a loop).

These encode docs/design.md (the rules):
  rule 1  a finished session-mode record dies `subagent_session_ttl_s` after its
          cleanup *completed*, not after it ended, so deferred cleanup is never cut short;
  rule 7  the ended notification is reported once; the sweep reports `swept` only
          for a record that has reported nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from clawgate.clip import clip
from clawgate.errors import Forbidden
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


def check_spawn_limits(
    requester: str, depth: int, children: int, max_depth: int, max_children: int
) -> Forbidden | None:
    """Why a spawn at `depth` by a requester with `children` active children is refused, or
    None (the requester's profile sets maxSpawnDepth and maxChildrenPerAgent)."""
    if depth > max_depth:
        return Forbidden(
            f"spawn depth {depth} exceeds maxSpawnDepth {max_depth}",
            details={"depth": depth, "maxSpawnDepth": max_depth},
        )
    if children >= max_children:
        return Forbidden(
            f"{clip(requester)} already has {children} active children (maxChildrenPerAgent {max_children})",
            details={"activeChildren": children, "maxChildrenPerAgent": max_children},
        )
    return None


def cleanup_reason(rec: SubagentRecord) -> str:
    return "deleted" if rec.cleanup == "delete" else "completed"


def sweep_reason(rec: SubagentRecord) -> str | None:
    """What the TTL sweep reports: `swept` if nothing was reported yet, else nothing (silent)."""
    return "swept" if rec.ended_reason is None else None


def sweep_deletes_child_session(rec: SubagentRecord) -> bool:
    """Run-mode archive removes the child session; session-mode children stay for follow-ups."""
    return rec.mode == "run" and rec.cleanup == "keep"


def sweep_finishes_cleanup(rec: SubagentRecord) -> bool:
    """A `delete` record handed to the sweep before its cleanup completed: the sweep deletes."""
    return rec.cleanup == "delete" and rec.cleanup_completed_at is None


def sweep_needs_hook(rec: SubagentRecord) -> bool:
    """Whether archiving this record calls the ended hooks (then it is not done inside the tick)."""
    return sweep_reason(rec) is not None or not rec.ended_notified


def sweep_retry_delay(failures: int) -> float:
    """How far a record whose archive failed `failures` times in a row is pushed back.

    The first failure is retried on the next tick; from the second on the record moves
    behind the others (60 s, doubling, at most an hour), so records that keep failing
    cannot hold the head of the due index against the ones behind them.
    """
    if failures <= 1:
        return 0.0
    return float(min(60 * 2 ** (failures - 2), 3600))


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
