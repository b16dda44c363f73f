"""Retention decisions as pure functions (tested without a loop, a store or a file system).

Every record the gateway writes to disk has a rule here that bounds it: sessions by
idle time and by count (least recently used first), transcripts by messages and
bytes, finished run records by age and by count. The retention service
(retention/service.py) feeds these functions what the store reports and applies
their answers; the store methods only move data.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

# The rule names reported by `sessions.cleanup`, `status` and
# `clawgate_retention_removed_total{rule}`.
SESSION_IDLE = "session_idle"
MAX_SESSIONS = "max_sessions"
TRANSCRIPT = "transcript_messages"
RUN_AGE = "run_age"
RUN_MAX = "run_max"
ATTACHMENTS = "attachments"
ORPHANS = "orphans"
RULES = (SESSION_IDLE, MAX_SESSIONS, TRANSCRIPT, RUN_AGE, RUN_MAX, ATTACHMENTS, ORPHANS)

SessionStamp = tuple[str, float]  # (session key, updated_at) as read from the store


@dataclass(frozen=True)
class RetentionPolicy:
    session_idle_ttl_s: float
    max_sessions: int
    session_max_messages: int
    session_max_bytes: int
    run_retention_s: float
    run_retention_max: int


def idle_cutoff(now: float, policy: RetentionPolicy) -> float:
    """Sessions last updated before this are idle past their TTL."""
    return now - policy.session_idle_ttl_s


def run_cutoff(now: float, policy: RetentionPolicy) -> float:
    """Finished runs that ended at or before this are past their retention."""
    return now - policy.run_retention_s


def lru_excess(count: int, max_sessions: int) -> int:
    """How many of the least recently used sessions must go to get back to `max_sessions`."""
    return max(0, count - max_sessions)


def deletable(
    candidates: Iterable[SessionStamp], protected: AbstractSet[str], limit: int
) -> list[SessionStamp]:
    """The candidates that may be deleted: never a session with a run in flight or a live subagent."""
    out: list[SessionStamp] = []
    for stamp in candidates:
        if len(out) >= limit:
            break
        if stamp[0] not in protected:
            out.append(stamp)
    return out


def disk_verdict(
    used_bytes: int, budget_bytes: int, free_bytes: int | None, free_min_bytes: int
) -> str | None:
    """Why new work must wait for retention (None: admit). A budget or floor of 0 is off."""
    if budget_bytes and used_bytes > budget_bytes:
        return f"state dir uses {used_bytes} bytes, over diskBudgetBytes {budget_bytes}"
    if free_min_bytes and free_bytes is not None and free_bytes < free_min_bytes:
        return f"filesystem has {free_bytes} bytes free, under diskFreeMinBytes {free_min_bytes}"
    return None
