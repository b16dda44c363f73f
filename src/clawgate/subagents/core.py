"""The subagent registry's state and the primitives its parts share.

In memory, only records in flight (spawned -> cleanup completed and ended
reported) are held, in bounded registered structures; a finished record lives
in the store until its `expires_at`, where an indexed sweep removes it. So a
batch of 100,000 session-mode spawns holds nothing in memory once cleaned up,
and the store holds each record for exactly one TTL (docs/design.md: the leak, record lives).

Shared by the parts (subagents/spawn.py, pipeline.py, sweep.py): the tracked records and
their indexes, the bounded pipeline tasks (one per run; deferred, never dropped, at the
bound; a pipeline that fails for good strands its record for the archive sweep), the store
steps (retried with backoff, conditional, under this process' claim) and the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

from clawgate.errors import ClawgateError, StoreError
from clawgate.events.bus import EventBus
from clawgate.ids import RunId, SessionKey
from clawgate.runs.service import RunService
from clawgate.sessions.service import SessionService
from clawgate.settings import Settings
from clawgate.state.clock import Clock, Timer
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.state.ttlmap import TTLMap
from clawgate.store.base import Store
from clawgate.store.records import SubagentRecord
from clawgate.subagents import rules
from clawgate.subagents.hooks import JsonlEndedHook, SubagentEndedHook

log = structlog.get_logger("clawgate.subagents")
T = TypeVar("T")


class Superseded(Exception):
    """The record is gone (swept) or another process holds its claim: this pipeline stops."""


class PendingError:
    __slots__ = ("error", "recorded_at", "timer")

    def __init__(self, error: str, recorded_at: float) -> None:
        self.error = error
        self.recorded_at = recorded_at
        self.timer: Timer | None = None


class SubagentCore:
    """The registry's state and shared steps; `SubagentService` (service.py) is its face."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        store: Store,
        bus: EventBus,
        sessions: SessionService,
        runs: RunService,
        *,
        tasks: Supervisor | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # The gateway's supervisor holds the pipeline tasks and counts their failures; the
        # set below keeps this registry's own bound (`subagent_tasks`) and its stop.
        self.supervisor = tasks if tasks is not None else Supervisor(sleep=clock.sleep)
        self.store = store
        self.bus = bus
        self.sessions = sessions
        self.runs = runs
        cap = settings.max_tracked_runs
        # Backstop TTL only: records leave this map when their pipeline completes.
        self.active: TTLMap[RunId, SubagentRecord] = TTLMap(
            "subagent_runs",
            clock,
            ttl_s=settings.abort_ttl_max_s + settings.announce_hard_expiry_s,
            max_size=cap,
            lru=False,
            on_expire=self._on_record_expired,
        )
        self.by_child: TTLMap[SessionKey, RunId] = TTLMap("subagent_children", clock, max_size=cap, lru=False)
        self.by_requester: TTLMap[SessionKey, set[RunId]] = TTLMap(
            "subagent_requesters", clock, max_size=cap, lru=False
        )
        self.pending_errors: TTLMap[RunId, PendingError] = TTLMap(
            "subagent_pending_errors",
            clock,
            ttl_s=settings.pending_error_ttl_s,
            max_size=cap,
            lru=False,
            on_expire=self._on_pending_expired,
        )
        self.announces: TTLMap[RunId, float] = TTLMap(
            "subagent_announces", clock, ttl_s=settings.announce_hard_expiry_s, max_size=cap, lru=False
        )
        self.spawn_keys: TTLMap[str, RunId] = TTLMap(
            "spawn_idempotency", clock, ttl_s=settings.dedupe_ttl_s, max_size=settings.dedupe_max
        )
        for structure in (
            self.active,
            self.by_child,
            self.by_requester,
            self.pending_errors,
            self.announces,
            self.spawn_keys,
        ):
            registry.register(structure)
        # One pipeline task per run at most: a run can be finalized from several places
        # (its end hook, the grace timer, the pending-error sweep, restore), and a second
        # concurrent pipeline would announce and report twice (rule 7).
        # `start_pipeline` never lets it reach its bound (it defers instead), so nothing here
        # is ever evicted; `on_expire` would only log the bug.
        self.pipelines: TTLMap[RunId, asyncio.Task[None]] = TTLMap(
            "subagent_pipelines", clock, max_size=cap, lru=False, on_expire=self._on_pipeline_evicted
        )
        registry.register(self.pipelines)
        self.tasks: set[asyncio.Task[None]] = set()
        self.max_tasks = cap
        registry.add("subagent_tasks", self.tasks.__len__, ttl_s=None, max_size=cap)
        # Pipelines waiting for a free task slot (the bound on `subagent_tasks` is enforced).
        self.deferred: TTLMap[RunId, tuple[Callable[[], Coroutine[Any, Any, None]], str]] = TTLMap(
            "subagent_deferred", clock, max_size=cap, lru=False, on_expire=self._on_deferred_evicted
        )
        registry.register(self.deferred)
        # Records whose pipeline failed for good: the archive sweep persists and finishes them.
        self.stranded: TTLMap[RunId, SubagentRecord] = TTLMap(
            "subagent_stranded", clock, max_size=cap, lru=False, on_expire=self._on_stranded_evicted
        )
        registry.register(self.stranded)
        # Spawns admitted whose run is not in `runs_active` yet: counted against
        # max_tracked_runs, so admission and the reservation are one synchronous step.
        self.spawns_in_flight = 0
        registry.add(
            "subagent_spawns_in_flight",
            lambda: self.spawns_in_flight,
            ttl_s=None,
            max_size=cap,
            per_run=True,
        )
        self.owner = uuid.uuid4().hex[:12]  # this process, for claims on a shared store
        self.lease_s = max(settings.subagent_claim_lease_s, settings.ended_hook_timeout_s + 60)
        self.hooks: list[SubagentEndedHook] = []
        if settings.ended_hook_log is not None:
            self.hooks.append(
                JsonlEndedHook(
                    settings.ended_hook_log,
                    max_bytes=settings.ended_hook_log_max_bytes,
                    backups=settings.ended_hook_log_backups,
                )
            )
        self.hook_errors = 0
        self.hook_timeouts = 0
        self.step_retries = 0
        self.pipeline_failures = 0
        self.pipelines_deferred = 0
        self.archive_failures = 0  # failures of archive work handed off by earlier ticks
        # Set by the gateway: the same admission check the `sessions.spawn` RPC passes,
        # so an agent calling the tool cannot grow tracked runs past the limit either.
        self.admission_check: Callable[[], None] | None = None
        self.ended_reports = 0
        self.announce_failures = 0
        self.announces_expired = 0
        self.sweep_errors = 0
        self.attachments_root = settings.state_path / "attachments"
        # Finalizes a record whose pending error expired (the pipeline's, set by the service).
        self.on_pending_expired: Callable[[RunId, PendingError], None] | None = None
        self.stopping = False
        self.restoring = False

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.stopping = False

    async def stop(self) -> None:
        self.stopping = True
        # Grace timers live on the clock, which may outlive this gateway (a restart in the
        # same process): a stopped service must not finalize anything. The store keeps the
        # record live, so the next start resumes it.
        for pending in self.pending_errors.values():
            if pending.timer is not None:
                pending.timer.cancel()
        self.deferred.clear()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def counters(self) -> dict[str, int]:
        """The registry's long-tail counters (status and /metrics)."""
        return {
            "quarantined": self.store.subagents_quarantined,
            "sweepErrors": self.sweep_errors,
            "hookErrors": self.hook_errors,
            "hookTimeouts": self.hook_timeouts,
            "stepRetries": self.step_retries,
            "pipelineFailures": self.pipeline_failures,
            "pipelinesDeferred": self.pipelines_deferred,
            "stranded": len(self.stranded),
        }

    # -- pipeline tasks: one per run, bounded, deferred at the bound -----------------------------------
    def start_pipeline(self, run_id: RunId, make: Callable[[], Coroutine[Any, Any, None]], name: str) -> bool:
        """Start the pipeline of `run_id` unless one is already in flight (or we are stopping).

        At the `subagent_tasks` bound the start is deferred until a task ends, never dropped.
        """
        if self.stopping or run_id in self.pipelines or run_id in self.deferred:
            return False
        if len(self.tasks) >= self.max_tasks:
            self.pipelines_deferred += 1
            log.warning("subagent pipeline deferred: task bound reached", run_id=run_id)
            self.deferred.set(run_id, (make, name))
            return True
        # Supervisor task names label a metric: the step ("archive", "pipeline"...), not the run.
        task = self.supervisor.spawn(self._guarded(run_id, make), name=f"subagent-{name.split(':', 1)[0]}")
        self.pipelines.set(run_id, task)
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(run_id, t))
        return True

    def _task_done(self, run_id: RunId, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.pipelines.get(run_id) is task:
            self.pipelines.pop(run_id)
        while self.deferred and len(self.tasks) < self.max_tasks and not self.stopping:
            next_id = next(self.deferred.keys())
            entry = self.deferred.pop(next_id)
            if entry is not None:
                self.start_pipeline(next_id, *entry)

    async def _guarded(self, run_id: RunId, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a pipeline; one that fails for good leaves its record to the archive sweep."""
        try:
            await make()
        except Superseded:
            rec = self.active.get(run_id)
            if rec is not None:
                self.untrack(rec)
        except Exception as exc:
            self.pipeline_failures += 1
            log.error(
                "subagent pipeline gave up; the archive sweep finishes it", run_id=run_id, error=repr(exc)
            )
            rec = self.active.get(run_id)
            if rec is not None:
                self.strand(rec)

    def strand(self, rec: SubagentRecord) -> None:
        # Due now: the next sweep reports what was not reported and removes the record.
        rec.expires_at = self.clock.time()
        self.untrack(rec)
        self.stranded.set(rec.run_id, rec)

    def _on_pipeline_evicted(self, run_id: RunId, task: asyncio.Task[None], why: str) -> None:
        log.error("subagent pipeline entry evicted", run_id=run_id, why=why)

    def _on_deferred_evicted(self, run_id: RunId, entry: object, why: str) -> None:
        rec = self.active.get(run_id)
        log.error("deferred subagent pipeline evicted; left to the archive sweep", run_id=run_id, why=why)
        if rec is not None:
            self.strand(rec)

    def _on_stranded_evicted(self, run_id: RunId, rec: SubagentRecord, why: str) -> None:
        # Its stored row is still live: the next start resumes it.
        log.error("stranded subagent record evicted from memory", run_id=run_id, why=why)

    # -- store steps: retried, conditional, claimed --------------------------------------------------
    async def retry(self, step: str, rec: SubagentRecord, fn: Callable[[], Awaitable[T]]) -> T:
        """Retry a step that touches the store with the announce backoff, on the clock, for at
        most `subagent_retry_window_s`; then the error propagates (the pipeline is stranded)."""
        started = self.clock.time()
        attempt = 0
        while True:
            try:
                return await fn()
            except (StoreError, OSError) as exc:
                attempt += 1
                self.step_retries += 1
                if self.clock.time() - started >= self.settings.subagent_retry_window_s:
                    raise
                log.warning("subagent step failed, retrying", step=step, run_id=rec.run_id, error=str(exc))
                await self.clock.sleep(rules.announce_delay(attempt, self.settings.announce_retry_delays_s))

    async def hold(self, rec: SubagentRecord) -> None:
        """Take or renew this process' claim on the record (a no-op on a one-process store)."""
        if not await self.store.claim_subagent(rec.run_id, self.owner, self.clock.time(), self.lease_s):
            raise Superseded(rec.run_id)

    async def save(self, rec: SubagentRecord) -> None:
        await self.hold(rec)
        if not await self.store.update_subagent(rec):
            raise Superseded(rec.run_id)  # swept meanwhile: never re-inserted

    async def release(self, rec: SubagentRecord) -> None:
        with contextlib.suppress(ClawgateError, OSError):
            await self.store.release_subagent(rec.run_id, self.owner)

    # -- tracking --------------------------------------------------------------------------------------
    def active_children(self, requester: SessionKey) -> int:
        ids = self.by_requester.get(requester)
        if not ids:
            return 0
        n = 0
        for rid in ids:
            rec = self.active.get(rid)
            if rec is not None and rec.status != "ended":
                n += 1
        return n

    def track(self, rec: SubagentRecord) -> None:
        run_id = rec.run_id
        self.active.set(run_id, rec)
        self.by_child.set(rec.child_session_key, run_id)
        requester = rec.requester_session_key
        ids = self.by_requester.get(requester)
        if ids is None:
            self.by_requester.set(requester, {run_id})
        else:
            ids.add(run_id)

    def untrack(self, rec: SubagentRecord) -> None:
        run_id = rec.run_id
        self.active.pop(run_id)
        self.by_child.pop(rec.child_session_key)
        requester = rec.requester_session_key
        ids = self.by_requester.get(requester)
        if ids is not None:
            ids.discard(run_id)
            if not ids:
                self.by_requester.pop(requester)
        self.announces.pop(run_id)
        pending = self.pending_errors.pop(run_id)
        if pending is not None and pending.timer is not None:
            pending.timer.cancel()

    def set_pending(self, run_id: RunId, pending: PendingError) -> None:
        old = self.pending_errors.pop(run_id)
        if old is not None and old.timer is not None:
            old.timer.cancel()
        self.pending_errors.set(run_id, pending)

    def _on_pending_expired(self, run_id: RunId, pending: PendingError, why: str) -> None:
        # Rule 4: swept 5 min after it was recorded, whatever happened to its grace timer.
        if pending.timer is not None:
            pending.timer.cancel()
        if self.on_pending_expired is not None:
            self.on_pending_expired(run_id, pending)

    def _on_record_expired(self, run_id: RunId, rec: SubagentRecord, why: str) -> None:
        log.warning("subagent record hit its in-memory backstop", run_id=run_id, why=why)
        self.by_child.pop(rec.child_session_key)
        ids = self.by_requester.get(rec.requester_session_key)
        if ids is not None:
            ids.discard(run_id)
            if not ids:
                self.by_requester.pop(rec.requester_session_key)

    def ttls(self) -> rules.Ttls:
        return rules.Ttls(self.settings.subagent_session_ttl_s, self.settings.subagent_archive_after_s)

    def event(self, rec: SubagentRecord, phase: str, outcome: str | None = None) -> None:
        payload: dict[str, Any] = {
            "runId": rec.run_id,
            "childSessionKey": rec.child_session_key,
            "requesterSessionKey": rec.requester_session_key,
            "phase": phase,
        }
        if outcome is not None:
            payload["outcome"] = outcome
        self.bus.emit_session_event(rec.requester_session_key, "subagent", payload)
