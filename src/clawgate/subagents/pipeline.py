"""The pipeline after a child run ends: [pending error grace] -> ended (outcome, frozen
result) -> announce (with retries) -> cleanup (keep/delete) -> ended hook (once) -> done.

Each step is idempotent, persisted and resumable after a restart (subagents/sweep.py);
every write is conditional (a record removed by a sweep is never re-inserted) and made
under this process' claim; every hook call has a timeout.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import structlog

from clawgate.errors import StoreError
from clawgate.ids import RunId, SessionKey
from clawgate.runs.service import INTERRUPTED
from clawgate.sessions.keys import is_subagent
from clawgate.store.records import RunRecord, SubagentRecord, TranscriptMessage
from clawgate.subagents import attachments, rules
from clawgate.subagents.core import PendingError, SubagentCore, Superseded
from clawgate.subagents.hooks import SubagentEnded, call_hook

log = structlog.get_logger("clawgate.subagents")


class Pipeline:
    def __init__(self, core: SubagentCore) -> None:
        self.core = core

    def on_run_start(self, run: RunRecord) -> None:
        run_id = run.run_id
        rec = self.core.active.get(run_id) if run.kind == "subagent" else None
        if rec is None:
            return
        # The backstop counts from the start, not the spawn (as `runs_active` does): a child
        # that waited long in the queue keeps its record for its whole run.
        self.core.active.touch(run_id)
        rec.status = "running"
        self.core.store.update_subagent(rec)

    def on_event(self, run_id: RunId, key: SessionKey, stream: str, data: dict[str, Any]) -> None:
        if stream != "lifecycle" or not is_subagent(key):
            return
        phase = data.get("phase")
        if phase == "error" and data.get("willRetry"):
            # Held as pending: the run may recover (a later start clears it).
            self.core.set_pending(run_id, PendingError(str(data.get("error")), self.core.clock.time()))
        elif phase == "start":
            pending = self.core.pending_errors.pop(run_id)
            if pending is not None and pending.timer is not None:
                pending.timer.cancel()

    def on_run_end(self, run: RunRecord) -> None:
        if run.kind != "subagent":
            return
        run_id = run.run_id
        rec = self.core.active.get(run_id)
        if self.core.stopping:
            return
        if rec is None:
            # Not tracked here any more (its in-memory backstop fired): the stored record
            # still gets its end.
            self.core.start_pipeline(
                run_id,
                partial(self._finalize_stored, run_id, run.status, run.error, run.result_text),
                f"finalize:{run_id}",
            )
            return
        if rec.status == "ended":
            return
        if (
            run.status == "error"
            and run.error != INTERRUPTED
            and self.core.settings.lifecycle_error_grace_s > 0
        ):
            # A lifecycle error is held for the grace period before the run is finalized as error.
            pending = PendingError(run.error or "error", self.core.clock.time())
            self.core.set_pending(run_id, pending)
            pending.timer = self.core.clock.call_later(
                self.core.settings.lifecycle_error_grace_s, lambda: self._grace_over(run_id, run)
            )
            return
        self.core.start_pipeline(
            run_id,
            partial(self.finalize, rec, run.status, run.error, run.result_text, resumed=self.core.restoring),
            f"finalize:{run_id}",
        )

    def _grace_over(self, run_id: RunId, run: RunRecord) -> None:
        pending = self.core.pending_errors.pop(run_id)
        rec = self.core.active.get(run_id)
        if rec is None or rec.status == "ended":
            return
        error = pending.error if pending is not None else run.error
        self.core.start_pipeline(
            run_id, partial(self.finalize, rec, "error", error, run.result_text), f"finalize:{run_id}"
        )

    def on_pending_expired(self, run_id: RunId, pending: PendingError) -> None:
        """Rule 4: a pending error swept 5 min after it was recorded (its timer is cancelled
        by the core) finalizes the record as error if its run is gone."""
        rec = self.core.active.get(run_id)
        if rec is not None and rec.status != "ended" and run_id not in self.core.runs.active:
            self.core.start_pipeline(
                run_id, partial(self.finalize, rec, "error", pending.error, None), f"finalize:{run_id}"
            )

    async def _finalize_stored(
        self, run_id: RunId, outcome: str, error: str | None, text: str | None
    ) -> None:
        rec = await self.core.retry(
            "load", _placeholder(run_id), lambda: self.core.store.get_subagent(run_id)
        )
        if rec is None or rec.status == "ended" or run_id in self.core.active:
            return
        self.core.track(rec)
        await self.finalize(rec, outcome, error, text)

    async def finalize(
        self, rec: SubagentRecord, outcome: str, error: str | None, text: str | None, *, resumed: bool = False
    ) -> None:
        if rec.status != "ended":
            rec.status = "ended"
            rec.outcome = outcome
            rec.error = error
            rec.ended_at = self.core.clock.time()
            rec.frozen_result = rules.freeze(text, self.core.settings.frozen_result_max_bytes)
            await self.core.retry("ended", rec, lambda: self.core.save(rec))
            self.core.event(rec, "ended", outcome=outcome)
        await self.continue_ended(rec, resumed=resumed)

    async def continue_ended(self, rec: SubagentRecord, *, resumed: bool) -> None:
        """Run the remaining pipeline steps for an ended record (also used after a restart)."""
        await self.core.retry("claim", rec, lambda: self.core.hold(rec))
        if rec.announced_at is None and rec.ended_reason != "released":
            await self._announce(rec)
        if rec.cleanup_completed_at is None:
            await self._cleanup(rec)
        if rec.ended_reason is None:
            await self.report(rec, rules.cleanup_reason(rec))
        elif resumed and not rec.ended_notified:
            # Recorded before a crash, delivery not confirmed: deliver once more, flagged. In a
            # live pipeline a set reason means whoever set it (release) is delivering it.
            await self.deliver(rec, redelivery=True)
        self.core.untrack(rec)
        await self.core.release(rec)

    async def _announce(self, rec: SubagentRecord) -> None:
        run_id = rec.run_id
        started = self.core.clock.time()
        self.core.announces.set(run_id, started)
        requester = rec.requester_session_key
        text = rules.announce_text(rec)
        attempt = 0
        delivered = False
        while True:
            if rec.ended_reason == "released":
                break  # the requester was deleted meanwhile: nothing to announce into
            try:
                await self.core.hold(rec)
                # Appended only if the requester's session still exists, atomically with the
                # check: an announce in flight (or between retries) never re-creates a deleted
                # session or its transcript.
                delivered = await self.core.sessions.append_to_existing(
                    _announce_message(requester, text, rec.run_id, self.core.clock.time())
                )
                if not delivered:
                    log.info("announce dropped: requester session is gone", run_id=rec.run_id)
                break
            except (StoreError, OSError) as exc:
                attempt += 1
                self.core.announce_failures += 1
                now = self.core.clock.time()
                # The soft expiry counts from this attempt series; the hard one from the end,
                # so a pipeline resumed after a long downtime does not retry for another 5 min.
                ended = rec.ended_at if rec.ended_at is not None else started
                if (
                    now - started >= self.core.settings.announce_expiry_s
                    or now - ended >= self.core.settings.announce_hard_expiry_s
                ):
                    self.core.announces_expired += 1
                    log.warning("announce expired", run_id=rec.run_id, error=str(exc), attempts=attempt)
                    break
                await self.core.clock.sleep(
                    rules.announce_delay(attempt, self.core.settings.announce_retry_delays_s)
                )
        self.core.announces.pop(run_id)
        # Set even when the announce expired: the step is over either way, cleanup goes on.
        rec.announced_at = self.core.clock.time()
        await self.core.retry("announce", rec, lambda: self.core.save(rec))
        if delivered:
            self.core.event(rec, "announced", outcome=rec.outcome)

    async def _cleanup(self, rec: SubagentRecord) -> None:
        if rec.cleanup == "delete":
            child = rec.child_session_key
            await self.core.retry("cleanup", rec, lambda: self.core.sessions.delete(child))
            await attachments.discard(rec.attachments_dir)
            rec.attachments_dir = None
        now = self.core.clock.time()
        rec.cleanup_completed_at = now
        rec.expires_at = rules.expiry_after_cleanup(rec, self.core.ttls())
        await self.core.retry("cleanup", rec, lambda: self.core.save(rec))
        self.core.event(rec, "cleaned", outcome=rec.outcome)

    async def report(self, rec: SubagentRecord, reason: str, *, retry: bool = True) -> None:
        """Record the ended reason durably, then notify the hooks: once per run (rule 7)."""
        if rec.ended_reason is not None:
            return
        rec.ended_reason = reason  # type: ignore[assignment]
        rec.ended_notified = False
        await self._step("report", rec, retry)
        await self.deliver(rec, redelivery=False, retry=retry)

    async def _step(self, step: str, rec: SubagentRecord, retry: bool) -> None:
        if retry:
            await self.core.retry(step, rec, lambda: self.core.save(rec))
        else:
            await self.core.save(rec)

    async def deliver(self, rec: SubagentRecord, *, redelivery: bool, retry: bool = True) -> None:
        assert rec.ended_reason is not None
        event = SubagentEnded(
            run_id=rec.run_id,
            child_session_key=rec.child_session_key,
            requester_session_key=rec.requester_session_key,
            reason=rec.ended_reason,
            outcome=rec.outcome,
            label=rec.label,
            mode=rec.mode,
            ended_at=rec.ended_at,
            redelivery=redelivery,
        )
        timeout = self.core.settings.ended_hook_timeout_s
        for hook in self.core.hooks:
            # The claim is renewed before each hook, and outlasts its timeout.
            if retry:
                await self.core.retry("claim", rec, lambda: self.core.hold(rec))
            else:
                await self.core.hold(rec)
            outcome = await call_hook(hook, event, self.core.clock, timeout)
            if outcome == "timeout":
                # Abandoned, like a hook that raises: logged, counted, not re-delivered.
                self.core.hook_timeouts += 1
                log.error("subagent ended hook timed out", run_id=rec.run_id, timeout_s=timeout)
            elif outcome == "error":
                # A hook that raises is logged; the registry goes on (and does not re-deliver).
                self.core.hook_errors += 1
                log.error("subagent ended hook failed", run_id=rec.run_id)
        self.core.ended_reports += 1
        rec.ended_notified = True
        await self._step("delivered", rec, retry)

    async def adopt(self, run_id: str) -> None:
        """This process is about to execute (or orphan) a child run spawned by another process:
        track its record here so the end hook runs its pipeline."""
        if RunId(run_id) in self.core.active:
            return
        rec = await self.core.store.get_subagent(run_id)
        if rec is not None and rec.cleanup_completed_at is None:
            self.core.track(rec)

    def forget_remote(self, run_id: RunId) -> None:
        """Another process ended this child run and runs its pipeline: stop tracking it here."""
        rec = self.core.active.get(run_id)
        if rec is None or run_id in self.core.pipelines or run_id in self.core.pending_errors:
            return
        if run_id in self.core.runs.active:
            return  # still executing here
        self.core.untrack(rec)

    async def release_requester(self, requester: SessionKey) -> int:
        """The requester session is gone: its unfinished children are reported `released`."""
        released = 0
        for run_id in list(self.core.by_requester.get(requester) or ()):
            rec = self.core.active.get(run_id)
            if rec is None or rec.ended_reason is not None:
                continue
            if run_id in self.core.runs.active:
                self.core.runs.abort(run_id)
            try:
                # Within the request: one attempt per write, the caller gets a store error.
                await self.report(rec, "released", retry=False)
            except Superseded:
                continue  # removed, or another process works on it and reports it
            released += 1
        return released


def _placeholder(run_id: RunId) -> SubagentRecord:
    """A record that only names a run id (for log lines before the record is loaded)."""
    return SubagentRecord(
        run_id=run_id, child_session_key=SessionKey(""), requester_session_key=SessionKey(""), task=""
    )


def _announce_message(requester: SessionKey, text: str, run_id: RunId, now: float) -> TranscriptMessage:
    return TranscriptMessage(session_key=requester, role="system", content=text, ts=now, run_id=run_id)
