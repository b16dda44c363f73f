"""The retention pass: every rule for what lives on disk, run by the maintenance scheduler.

One pass, in order: idle sessions, sessions past `max_sessions` (least recently used
first), transcripts past their bounds, finished runs past their age and count,
attachment directories whose session and record are gone; then the store gives the
freed pages back (SQLite incremental vacuum) and the disk figures are re-measured.
The decisions are in retention/policy.py; this module reads, asks the policy and
deletes. Sessions with a run in flight or a live subagent are never deleted.
`sessions.cleanup` runs the same pass on demand, optionally as a dry run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from clawgate.ids import SessionKey
from clawgate.retention import files, policy
from clawgate.retention.policy import RetentionPolicy
from clawgate.settings import Settings
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.store.base import Store

if TYPE_CHECKING:
    from clawgate.runs.service import RunService
    from clawgate.sessions.service import SessionService
    from clawgate.subagents.service import SubagentService

log = structlog.get_logger("clawgate.retention")

PASS_MAX = 50_000  # sessions considered per rule per pass; the next pass goes on


def policy_of(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(
        session_idle_ttl_s=settings.session_idle_ttl_s,
        max_sessions=settings.max_sessions,
        session_max_messages=settings.session_max_messages,
        session_max_bytes=settings.session_max_bytes,
        run_retention_s=settings.run_retention_s,
        run_retention_max=settings.run_retention_max,
    )


class Retention:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        store: Store,
        sessions: SessionService,
        runs: RunService,
        subagents: SubagentService,
    ) -> None:
        self.policy = policy_of(settings)
        self.clock = clock
        self.store = store
        self.sessions = sessions
        self.runs = runs
        self.subagents = subagents
        self.attachments_root: Path = subagents.attachments_root
        self.removed: dict[str, int] = dict.fromkeys(policy.RULES, 0)
        self.compacted_bytes = 0
        self.passes = 0
        self.rows: dict[str, int] = {}
        self.store_bytes = 0
        self.attachments_bytes = 0
        self.measured_at = float("-inf")
        # The store right after a pass has given pages back (no WAL in it): the figure that
        # follows the rows, where `store_bytes` also swings with the WAL between checkpoints.
        self.store_bytes_after_pass = 0
        # Called after each pass (the disk monitor re-measures, so admission reopens at once).
        self.on_pass: Callable[[], Awaitable[object]] | None = None
        self._lock = asyncio.Lock()
        # Finished runs keep the name of their sweep ("store_runs"); the rest is "retention".
        registry.add_sweep("store_runs", self.sweep_runs)
        registry.add_sweep("retention", self.sweep)

    # -- the maintenance sweep --------------------------------------------------------------------
    async def sweep_runs(self) -> int:
        async with self._lock:
            report = await self._runs(self.clock.time(), dry_run=False)
            for rule, n in report.items():
                self.removed[rule] += n
            return sum(report.values())

    async def sweep(self) -> int:
        report = await self.run(runs=False)
        return sum(report.values())

    async def run(self, *, dry_run: bool = False, runs: bool = True) -> dict[str, int]:
        """One pass of every rule; returns what each removed (or, dry, would remove).
        `runs=False` leaves finished runs to their own sweep (`store_runs`)."""
        async with self._lock:  # the scheduler and `sessions.cleanup` never overlap
            report = await self._pass(dry_run)
            if runs:
                report.update(await self._runs(self.clock.time(), dry_run=dry_run))
            if not dry_run:
                for rule, n in report.items():
                    self.removed[rule] += n
                self.passes += 1
                self.compacted_bytes += await self.store.compact()
                await self.refresh_stats()
                self.store_bytes_after_pass = self.store_bytes
                if self.on_pass is not None:
                    await self.on_pass()
            return report

    async def _pass(self, dry_run: bool) -> dict[str, int]:
        now = self.clock.time()
        protected = await self._protected()
        report = dict.fromkeys(policy.RULES, 0)
        gone: set[str] = set()

        idle = await self.store.stale_sessions(policy.idle_cutoff(now, self.policy), PASS_MAX)
        deleted = await self._delete_sessions(idle, protected, dry_run)
        report[policy.SESSION_IDLE] = len(deleted)
        gone.update(deleted)

        excess = policy.lru_excess(
            await self.store.count_sessions() - (len(gone) if dry_run else 0), self.policy.max_sessions
        )
        if excess:
            oldest = await self.store.oldest_sessions(min(PASS_MAX, excess + len(protected) + len(gone)))
            oldest = [stamp for stamp in oldest if stamp[0] not in gone]
            deleted = await self._delete_sessions(
                oldest[: excess + len(protected)], protected, dry_run, excess
            )
            report[policy.MAX_SESSIONS] = len(deleted)
            gone.update(deleted)

        written, overflow = self.sessions.take_written(peek=dry_run)
        if overflow:
            written = await self.store.oversized_transcripts(
                self.policy.session_max_messages, self.policy.session_max_bytes, PASS_MAX
            )
        report[policy.TRANSCRIPT] = await self.store.trim_transcripts(
            [key for key in written if key not in gone],
            self.policy.session_max_messages,
            self.policy.session_max_bytes,
            dry_run=dry_run,
        )

        report[policy.ATTACHMENTS] = await self.collect_attachments(gone, dry_run=dry_run)
        if report[policy.SESSION_IDLE] or report[policy.MAX_SESSIONS]:
            log.info("retention deleted sessions", dry_run=dry_run, **{k: v for k, v in report.items() if v})
        return report

    async def _runs(self, now: float, *, dry_run: bool) -> dict[str, int]:
        cutoff = policy.run_cutoff(now, self.policy)
        if dry_run:
            aged = await self.store.count_finished_runs_before(cutoff)
            over = await self.store.prune_finished_runs(self.policy.run_retention_max, dry_run=True)
            return {policy.RUN_AGE: aged, policy.RUN_MAX: max(0, over - aged)}
        aged = await self.store.sweep_runs(cutoff)
        return {
            policy.RUN_AGE: aged,
            policy.RUN_MAX: await self.store.prune_finished_runs(self.policy.run_retention_max),
        }

    async def _delete_sessions(
        self,
        candidates: list[policy.SessionStamp],
        protected: AbstractSet[str],
        dry_run: bool,
        limit: int = PASS_MAX,
    ) -> list[str]:
        if not candidates:
            return []
        # Runs accepted while the candidates were read are protected too (in memory, no await
        # between this check and the delete being queued behind their writes).
        protected = protected | self._in_flight()
        keys = await self.store.delete_sessions_if_idle(
            policy.deletable(candidates, protected, limit), dry_run=dry_run
        )
        if not dry_run:
            self.sessions.forget(keys)
        return keys

    def _in_flight(self) -> set[SessionKey]:
        keys = {run.record.session_key for run in self.runs.active.values()}
        for rec in self.subagents.active.values():
            keys.add(rec.child_session_key)
            keys.add(rec.requester_session_key)
        return keys

    async def _protected(self) -> set[SessionKey]:
        """Sessions never deleted: a run in flight or a live subagent, here or in another process."""
        keys = self._in_flight()
        for run in await self.store.unfinished_runs():
            keys.add(run.session_key)
        for rec in await self.store.live_subagents():
            keys.add(rec.child_session_key)
            keys.add(rec.requester_session_key)
        return keys

    # -- attachments ------------------------------------------------------------------------------------
    async def collect_attachments(
        self, gone: set[str], *, dry_run: bool = False, startup: bool = False
    ) -> int:
        """Remove attachment directories whose session and subagent record are both gone.

        At start-up a directory without a recorded owner and without a record is removed
        too (left by a crash, or written before owners were recorded)."""
        entries = await asyncio.to_thread(files.scan_attachments, self.attachments_root)
        removed = 0
        live = {rec.run_id for rec in self.subagents.active.values()}
        for entry in entries:
            if entry.run_id in live:
                continue
            if entry.owner is None and entry.has_dir and not startup:
                continue  # its record may still be on its way to the store
            if (
                entry.owner is not None
                and entry.owner not in gone
                and await self.store.get_session(entry.owner) is not None
            ):
                continue  # kept with its session (retained attachments)
            if await self.store.get_subagent(entry.run_id) is not None:
                continue
            if not dry_run:
                await asyncio.to_thread(files.remove_attachments, self.attachments_root, entry.run_id)
            removed += int(entry.has_dir)
        return removed

    async def startup(self) -> int:
        """Before the first pass: remove what a crash left with nothing referring to it."""
        n = await self.store.remove_orphans()
        n += await self.collect_attachments(set(), startup=True)
        self.removed[policy.ORPHANS] += n
        if n:
            log.info("removed orphans left on disk", count=n)
        await self.refresh_stats()
        return n

    # -- figures ------------------------------------------------------------------------------------------
    async def refresh_stats(self, *, bytes_max_age_s: float = 0.0) -> None:
        """Count rows again; measure bytes again unless younger than `bytes_max_age_s`
        (`status` is polled, and on Redis measuring bytes walks every key of the store)."""
        self.rows = await self.store.table_rows()
        if bytes_max_age_s and time.monotonic() - self.measured_at < bytes_max_age_s:
            return
        self.measured_at = time.monotonic()
        self.store_bytes = await self.store.store_bytes()
        self.attachments_bytes = await asyncio.to_thread(files.tree_bytes, self.attachments_root)

    def describe(self) -> dict[str, object]:
        return {
            "rows": dict(self.rows),
            "storeBytes": self.store_bytes,
            "storeBytesAfterPass": self.store_bytes_after_pass,
            "attachmentsBytes": self.attachments_bytes,
            "removed": dict(self.removed),
            "compactedBytes": self.compacted_bytes,
            "passes": self.passes,
        }
