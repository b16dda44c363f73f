"""Scheduled runs: each job fires an agent turn (or a system message) on its schedule.

One loop per gateway sleeps on the injected clock until the earliest due job (at most
`cron_poll_s`, so jobs added by another process are seen), then fires what is due. Firing an
occurrence claims it in the store (compare-and-set of `nextRunAtMs`), so on Redis exactly one
process fires it; the run id is derived from the job and the occurrence
(`cron-<jobId>-<ms>`), so even a double claim could not start two runs. A job fires at most
`maxConcurrentRuns` runs at once (default 1; an occurrence that finds it busy is recorded as
`skipped`). Consecutive errors push the next run back (30 s, 1 min, 5 min, 15 min, 60 min).
History is bounded by count per job and by age.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any

import msgspec
import structlog

from clawgate.automation.schedule import ScheduleError, error_backoff_ms, next_fire_ms, validate
from clawgate.automation.webhook_rules import check_url
from clawgate.errors import InvalidRequest, NotFound
from clawgate.ids import RunId, SessionKey
from clawgate.runs.service import RunService, SubmitRequest
from clawgate.sessions.service import SessionService
from clawgate.settings import Settings
from clawgate.state.clock import Clock, wait_woken
from clawgate.state.supervisor import Supervisor
from clawgate.state.tasks import cancel_and_wait
from clawgate.store.cron_records import CronJob, CronRunEntry
from clawgate.store.cron_store import CronStore, due_score
from clawgate.store.records import RunRecord

log = structlog.get_logger("clawgate.cron")

RUN_PREFIX = "cron-"


def job_of_run(run_id: str) -> str | None:
    """The job id of a run started by cron (`cron-<jobId>-<ms>` or `cron-<jobId>-manual-<ms>`)."""
    if not run_id.startswith(RUN_PREFIX):
        return None
    body = run_id[len(RUN_PREFIX) :]
    job_id, _, rest = body.partition("-")
    return job_id if job_id and rest else None


class CronService:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        store: CronStore,
        runs: RunService,
        sessions: SessionService,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.runs = runs
        self.sessions = sessions
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.fired = 0
        self.skipped = 0
        self.lost_claims = 0
        self.errors = 0

    def now_ms(self) -> int:
        return int(self.clock.time() * 1000)

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self, tasks: Supervisor | None = None) -> None:
        """Open the store and start the loop, under the gateway's task supervisor when given one."""
        await self.store.open()
        if self.task is None:
            self.task = (tasks or Supervisor()).loop(
                "clawgate-cron", self._loop, retry_s=self.settings.cron_poll_s
            )

    async def stop(self) -> None:
        task, self.task = self.task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        while True:
            # Cleared before the look, not after: a wake-up during it (a job added) is kept.
            self.wake.clear()
            try:
                await self.fire_due()
                nxt = await self.store.next_due_ms()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                if self.runs.store.is_outage(exc):
                    log.warning("cron: store unreachable", error=str(exc)[:200])
                else:
                    log.exception("cron: tick failed")
                nxt = None
            wait_s = self.settings.cron_poll_s
            if nxt is not None:
                wait_s = min(wait_s, max(0.0, (nxt - self.now_ms()) / 1000))
            await wait_woken(self.clock, self.wake, wait_s)

    # -- firing -----------------------------------------------------------------------------------
    async def fire_due(self) -> int:
        fired = 0
        for job in await self.store.due_jobs(self.now_ms(), limit=100):
            scheduled = job.state.next_run_at_ms
            if scheduled is None:
                continue
            if await self._fire(job, scheduled, manual=False):
                fired += 1
        return fired

    async def _fire(self, job: CronJob, scheduled: int, *, manual: bool) -> bool:
        now = self.now_ms()
        running = [r for r in job.state.running if not await self._ended(r)]
        busy = len(running) >= job.max_concurrent_runs
        run_id = f"{RUN_PREFIX}{job.id}-manual-{now}" if manual else f"{RUN_PREFIX}{job.id}-{scheduled}"
        new = _copy(job)
        new.state.running = running if busy else [*running, run_id]
        if not manual:
            nxt = next_fire_ms(job.schedule, max(now, scheduled), created_ms=job.created_at_ms)
            if nxt is not None and job.state.consecutive_errors:
                nxt = max(nxt, now + error_backoff_ms(job.state.consecutive_errors))
            new.state.next_run_at_ms = nxt
            if not await self.store.claim(job, due_score(job), new):
                self.lost_claims += 1
                return False
        else:
            await self.store.put_job(new)
        if busy:
            self.skipped += 1
            skipped = CronRunEntry(
                job_id=job.id,
                run_id=run_id,
                scheduled_for_ms=scheduled,
                started_at_ms=now,
                ended_at_ms=now,
                status="skipped",
                error=f"still running {len(running)} of maxConcurrentRuns {job.max_concurrent_runs}",
            )
            await self.store.add_run(skipped, self.settings.cron_history_max)
            return False
        self.fired += 1
        await self._start_run(job, RunId(run_id))
        return True

    async def _ended(self, run_id: str) -> bool:
        _run, rec = await self.runs.lookup(RunId(run_id))
        return rec is None or rec.is_final

    def session_of(self, job: CronJob) -> SessionKey:
        return SessionKey(job.session_key or f"agent:{job.agent_id}:cron:{job.id}")

    async def _start_run(self, job: CronJob, run_id: RunId) -> None:
        key = self.session_of(job)
        p = job.payload
        if p.kind == "systemEvent":
            await self.sessions.touch(key)
            self.sessions.append(key, "system", p.text or "", run_id)
            await self._record_end(job.id, run_id, "ok", None, self.now_ms())
            return
        try:
            await self.runs.submit(
                SubmitRequest(
                    run_id=run_id,
                    session_key=key,
                    agent_id=job.agent_id,
                    message=p.message or "",
                    model=p.model,
                    timeout_s=p.timeout_seconds,
                    webhook=job.webhook,
                )
            )
        except Exception as exc:  # admission closed, shutting down: the occurrence failed
            await self._record_end(job.id, run_id, "error", f"could not start: {exc}", self.now_ms())

    # -- run ends ---------------------------------------------------------------------------------
    def on_run_end(self, rec: RunRecord) -> Awaitable[None] | None:
        """The run service's end hook: a cron run's end goes into its job's state and history
        (awaited by the run service); any other run costs nothing here."""
        job_id = job_of_run(rec.run_id)
        if job_id is None:
            return None
        started = int((rec.started_at or rec.accepted_at) * 1000)
        return self._record_end(job_id, rec.run_id, rec.status, rec.error, started)

    async def _record_end(
        self, job_id: str, run_id: str, status: str, error: str | None, started_ms: int
    ) -> None:
        now = self.now_ms()
        for _attempt in range(5):  # compare-and-set against a concurrent firing of the same job
            job = await self.store.get_job(job_id)
            if job is None:
                return
            expected = due_score(job)
            s = job.state
            s.running = [r for r in s.running if r != run_id]
            s.last_run_at_ms, s.last_status, s.last_error, s.last_run_id = now, status, error, run_id
            s.consecutive_errors = 0 if status == "ok" else s.consecutive_errors + 1
            if s.consecutive_errors and s.next_run_at_ms is not None:
                s.next_run_at_ms = max(s.next_run_at_ms, now + error_backoff_ms(s.consecutive_errors))
            if await self.store.claim(job, expected, job):
                break
        else:
            log.warning("cron: could not record a run end", job_id=job_id, run_id=run_id)
            return
        scheduled = _scheduled_of(run_id) or started_ms
        entry = CronRunEntry(
            job_id=job_id,
            run_id=run_id,
            scheduled_for_ms=scheduled,
            started_at_ms=started_ms,
            ended_at_ms=now,
            status=status,
            error=error,
        )
        await self.store.add_run(entry, self.settings.cron_history_max)
        if job.delete_after_run and s.next_run_at_ms is None and status == "ok":
            await self.store.delete_job(job_id)

    async def sweep_history(self) -> int:
        return await self.store.sweep_runs(self.now_ms() - int(self.settings.cron_history_ttl_s * 1000))

    # -- the API behind cron.* ----------------------------------------------------------------------
    async def add(self, fields: dict[str, Any]) -> CronJob:
        now = self.now_ms()
        existing = await self.store.list_jobs(self.settings.cron_max_jobs + 1)
        if len(existing) >= self.settings.cron_max_jobs:
            raise InvalidRequest(
                f"at most {self.settings.cron_max_jobs} cron jobs", details={"field": "cron_max_jobs"}
            )
        job = CronJob(id=uuid.uuid4().hex[:12], created_at_ms=now, updated_at_ms=now, **fields)
        self._check(job)
        # Strictly after now: `every 1h` first fires in an hour, not at once.
        job.state.next_run_at_ms = next_fire_ms(job.schedule, now, created_ms=now)
        await self.store.put_job(job)
        self.wake.set()
        return job

    async def get(self, job_id: str) -> CronJob:
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"unknown cron job {job_id[:64]!r}", details={"jobId": job_id})
        return job

    async def update(self, job_id: str, patch: dict[str, Any]) -> CronJob:
        job = await self.get(job_id)
        schedule_changed = "schedule" in patch
        for name, value in patch.items():
            setattr(job, name, value)
        job.updated_at_ms = self.now_ms()
        self._check(job)
        if schedule_changed or (job.enabled and job.state.next_run_at_ms is None):
            job.state.next_run_at_ms = next_fire_ms(job.schedule, self.now_ms(), created_ms=job.created_at_ms)
        await self.store.put_job(job)
        self.wake.set()
        return job

    async def remove(self, job_id: str) -> bool:
        return await self.store.delete_job(job_id)

    async def run_now(self, job_id: str) -> str:
        job = await self.get(job_id)
        before = job.state.running
        await self._fire(job, self.now_ms(), manual=True)
        after = await self.get(job_id)
        started = [r for r in after.state.running if r not in before]
        if not started:
            raise InvalidRequest(
                f"job {job_id} is already running {len(before)} of maxConcurrentRuns {job.max_concurrent_runs}",
                details={"field": "jobId"},
            )
        return started[0]

    def _check(self, job: CronJob) -> None:
        if job.webhook is not None:
            check_url(job.webhook)
        try:
            validate(job.schedule)
        except ScheduleError as exc:
            raise InvalidRequest(str(exc), details={"field": exc.field}) from None
        p = job.payload
        if p.kind == "agentTurn" and not p.message:
            raise InvalidRequest(
                "payload.message is required for an agentTurn", details={"field": "payload.message"}
            )
        if p.kind == "systemEvent" and not p.text:
            raise InvalidRequest(
                "payload.text is required for a systemEvent", details={"field": "payload.text"}
            )

    def stats(self) -> dict[str, int]:
        return {
            "fired": self.fired,
            "skipped": self.skipped,
            "lostClaims": self.lost_claims,
            "errors": self.errors,
        }


def _copy(job: CronJob) -> CronJob:
    return msgspec.json.decode(msgspec.json.encode(job), type=CronJob)


def _scheduled_of(run_id: str) -> int | None:
    tail = run_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() and "-manual-" not in run_id else None
