"""Cron schedules (pure): validation, the next firing time, error backoff.

Three kinds, with OpenClaw's names:
- `at`: one shot at an ISO-8601 time (UTC when it names no offset);
- `every`: every `everyMs` milliseconds from `anchorMs` (default: the job's creation);
- `cron`: five fields in an IANA time zone (`tz`, default UTC), evaluated by croniter.

Daylight-saving rules for `cron`: a wall-clock time that does not exist (spring forward) fires
once at the first valid time after it; a wall-clock time that occurs twice (fall back) fires
once, at its first occurrence.

Missed occurrences are never replayed one by one: the next firing time is always computed
from "now", so a gateway that was down fires an overdue job once at start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from clawgate.store.cron_records import CronSchedule

# Consecutive failures push the next run back by at least this much (OpenClaw's ladder).
ERROR_BACKOFF_MS = (30_000, 60_000, 300_000, 900_000, 3_600_000)
MIN_EVERY_MS = 1000


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message names the field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def validate(s: CronSchedule) -> None:
    if s.kind == "at":
        if not s.at:
            raise ScheduleError("schedule.at is required for kind 'at'", "schedule.at")
        parse_at_ms(s.at)
    elif s.kind == "every":
        if s.every_ms is None or s.every_ms < MIN_EVERY_MS:
            raise ScheduleError(f"schedule.everyMs must be at least {MIN_EVERY_MS}", "schedule.everyMs")
    elif s.kind == "cron":
        from croniter import croniter  # only for cron schedules (with dateutil, slow to import)

        if not s.expr or len(s.expr.split()) != 5 or not croniter.is_valid(s.expr):
            raise ScheduleError("schedule.expr must be a five-field cron expression", "schedule.expr")
        _zone(s.tz)
    else:
        raise ScheduleError("schedule.kind must be 'at', 'every' or 'cron'", "schedule.kind")


def parse_at_ms(text: str) -> int:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ScheduleError(f"schedule.at is not an ISO-8601 time: {text[:64]!r}", "schedule.at") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _zone(tz: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"schedule.tz is not an IANA time zone: {str(tz)[:64]!r}", "schedule.tz"
        ) from None


def next_fire_ms(s: CronSchedule, after_ms: int, *, created_ms: int) -> int | None:
    """The first firing time strictly after `after_ms`, or None when the schedule is over."""
    if s.kind == "at":
        at = parse_at_ms(s.at or "")
        return at if at > after_ms else None
    if s.kind == "every":
        every = s.every_ms or MIN_EVERY_MS
        anchor = s.anchor_ms if s.anchor_ms is not None else created_ms
        if after_ms < anchor:
            return anchor
        return anchor + ((after_ms - anchor) // every + 1) * every
    zone = _zone(s.tz)
    base = datetime.fromtimestamp(after_ms / 1000, zone)
    from croniter import croniter

    it = croniter(s.expr or "* * * * *", base)
    candidate: datetime = it.get_next(datetime)
    if candidate.replace(tzinfo=None) == base.replace(tzinfo=None):
        candidate = it.get_next(datetime)  # the repeated hour of a fall-back: fire once
    return int(candidate.timestamp() * 1000)


def error_backoff_ms(consecutive_errors: int) -> int:
    if consecutive_errors <= 0:
        return 0
    return ERROR_BACKOFF_MS[min(consecutive_errors, len(ERROR_BACKOFF_MS)) - 1]
