"""The archive sweep of finished records, and the restore of live ones after a restart.

The sweep removes records whose expiry has passed and reports `swept` only for records
that reported nothing; it never waits for a hook inside the maintenance tick (records
whose archive calls hooks go to an owned task) and skips records still worked on, here
or by another process holding their claim. After a restart, `load` brings live records
back before the runs are restored and `resume` continues every unfinished pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from functools import partial

import structlog

from clawgate.errors import StoreError
from clawgate.runs.service import INTERRUPTED
from clawgate.store.records import SubagentRecord
from clawgate.subagents import attachments, rules
from clawgate.subagents.core import SubagentCore, Superseded
from clawgate.subagents.pipeline import Pipeline

log = structlog.get_logger("clawgate.subagents")


class Sweeper:
    def __init__(self, core: SubagentCore, pipeline: Pipeline) -> None:
        self.core = core
        self.pipeline = pipeline

    async def sweep_store(self) -> int:
        """Remove records whose expiry has passed; report `swept` only for records that reported nothing.

        The tick holds the maintenance lock, so nothing here waits for a hook: a record whose
        archive calls the hooks (a `swept` report, a redelivery) is handed to an owned task,
        bounded by the hook timeout. Records still worked on (here, or by another process
        that holds their claim) are skipped. One record that fails is logged, skipped and,
        if it keeps failing, pushed behind the others; the sweep then raises so the
        maintenance tick counts the error (rule 6). Returns how many records were removed
        or handed to an archive task.
        """
        failed = await self._persist_stranded()
        failed += self.core.archive_failures
        self.core.archive_failures = 0
        removed = 0
        seen: set[str] = set()
        now = self.core.clock.time()
        batch = self.core.settings.subagent_sweep_batch
        while True:
            due = await self.core.store.due_subagents(now, batch)
            deletes: list[Awaitable[None]] = []
            progress = 0
            for rec in due:
                if rec.run_id in seen:
                    continue
                seen.add(rec.run_id)
                outcome = await self._sweep_due(rec, now)
                if outcome == "delete":
                    deletes.append(self.core.store.delete_subagent(rec.run_id))
                elif outcome == "handed":
                    removed += 1
                    progress += 1
                elif outcome == "failed":
                    failed += 1
                elif outcome == "postponed":
                    failed += 1
                    progress += 1
            # Deletes are grouped by the store; awaited before the next query so it sees them.
            if deletes:
                await asyncio.gather(*deletes)
            removed += len(deletes)
            if len(due) < batch or not (deletes or progress):
                break
        if failed:
            raise StoreError(f"subagent sweep: {failed} record(s) failed and were kept")
        return removed

    async def _sweep_due(self, rec: SubagentRecord, now: float) -> str:
        """One due record: skip | delete (archived here) | handed (to a task) | failed | postponed."""
        run_id = rec.run_id
        # Rule 1: a record still in its pipeline is never removed (expiry is set at cleanup,
        # so this only happens when its last steps are still in flight).
        if run_id in self.core.active or run_id in self.core.pipelines or run_id in self.core.deferred:
            return "skip"
        if rules.sweep_needs_hook(rec) and len(self.core.tasks) >= self.core.max_tasks:
            return "skip"  # next tick
        try:
            if not await self.core.store.claim_subagent(rec.run_id, self.core.owner, now, self.core.lease_s):
                return "skip"  # another process works on it (or removed it)
            if self.core.store.shared_by_processes:
                fresh = await self.core.store.get_subagent(rec.run_id)
                if fresh is None or fresh.expires_at is None or fresh.expires_at > now:
                    await self.core.release(rec)
                    return "skip"
                rec = fresh
        except (StoreError, OSError) as exc:
            self.core.sweep_errors += 1
            log.error("subagent sweep could not claim a record", run_id=rec.run_id, error=repr(exc))
            return "failed"
        if rules.sweep_needs_hook(rec):
            self.core.start_pipeline(run_id, partial(self._archive, rec), f"archive:{run_id}")
            return "handed"
        try:
            await self._sweep_one(rec)
        except Exception as exc:
            self.core.sweep_errors += 1
            # One line per record, no traceback: a batch failing together must not flood the log.
            log.error("subagent sweep failed for a record", run_id=rec.run_id, error=repr(exc))
            return "postponed" if await self._postpone(rec, now) else "failed"
        return "delete"

    async def _archive(self, rec: SubagentRecord) -> None:
        """Archive work that calls the hooks, off the tick (its claim is held)."""
        try:
            await self._sweep_one(rec)
            await self.core.store.delete_subagent(rec.run_id)
        except (StoreError, OSError, Superseded):
            self.core.sweep_errors += 1
            self.core.archive_failures += 1
            log.exception("subagent archive failed for a record", run_id=rec.run_id)
            await self._postpone(rec, self.core.clock.time())

    async def _postpone(self, rec: SubagentRecord, now: float) -> bool:
        """Count a failed archive; from the second one in a row the record moves behind the others."""
        rec.sweep_failures += 1
        delay = rules.sweep_retry_delay(rec.sweep_failures)
        if rec.expires_at is not None:
            rec.expires_at = max(rec.expires_at, now + delay)
        try:
            await self.core.store.update_subagent(rec)
        except (StoreError, OSError):
            return False
        finally:
            await self.core.release(rec)
        return delay > 0

    async def _persist_stranded(self) -> int:
        """Write the records of failed pipelines (due now) so the sweep below finishes them."""
        failed = 0
        for run_id, rec in list(self.core.stranded.items()):
            try:
                # A record gone from the store has nothing left to finish.
                await self.core.store.update_subagent(rec)
            except (StoreError, OSError):
                failed += 1
                continue
            self.core.stranded.pop(run_id)
        return failed

    async def _sweep_one(self, rec: SubagentRecord) -> None:
        if rules.sweep_deletes_child_session(rec) or rules.sweep_finishes_cleanup(rec):
            await self.core.sessions.delete(rec.child_session_key)
        if rules.sweep_removes_attachments(rec, self.core.settings.retain_attachments_on_keep):
            await attachments.discard(rec.attachments_dir)
        reason = rules.sweep_reason(rec)
        if reason is not None:
            await self.pipeline.report(rec, reason, retry=False)
        elif not rec.ended_notified:
            await self.pipeline.deliver(rec, redelivery=True, retry=False)

    async def load(self) -> int:
        """Before runs are restored: bring live records back into memory."""
        self.core.restoring = True
        live = await self.core.store.live_subagents()
        for rec in live:
            self.core.track(rec)
        return len(live)

    async def resume(self) -> int:
        """After runs are restored: end what has no live run, continue every unfinished pipeline."""
        resumed = 0
        try:
            for rec in list(self.core.active.values()):
                run_id = rec.run_id
                if run_id in self.core.pipelines or run_id in self.core.pending_errors:
                    continue  # already being finalized (e.g. its run was ended by the run restore)
                if rec.status != "ended":
                    if run_id in self.core.runs.active:
                        continue  # re-queued: it will run and end normally
                    _run, run_rec = await self.core.runs.lookup(run_id)
                    if run_rec is not None and run_rec.is_final and run_rec.error != INTERRUPTED:
                        outcome, error, text = run_rec.status, run_rec.error, run_rec.result_text
                    else:
                        outcome, error, text = "error", INTERRUPTED, None
                    self.core.start_pipeline(
                        run_id,
                        partial(self.pipeline.finalize, rec, outcome, error, text, resumed=True),
                        f"finalize:{run_id}",
                    )
                else:
                    self.core.start_pipeline(
                        run_id, partial(self.pipeline.continue_ended, rec, resumed=True), f"resume:{run_id}"
                    )
                resumed += 1
        finally:
            self.core.restoring = False
        return resumed
