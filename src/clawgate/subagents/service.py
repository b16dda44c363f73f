"""The subagent registry service: the life of a spawned run, from spawn to sweep.

In memory, only records in flight (spawned -> cleanup completed and ended
reported) are held, in bounded registered structures; a finished record lives
in the store until its `expires_at`, where an indexed sweep removes it. So a
batch of 100,000 session-mode spawns holds nothing in memory once cleaned up,
and the store holds each record for exactly one TTL (docs/design.md: the leak, record lives).

Pipeline after a child run ends (each step idempotent, persisted, resumable
after a restart): [pending error grace] -> ended (outcome, frozen result) ->
announce (with retries) -> cleanup (keep/delete) -> ended hook (once) -> done.

Long-tail rules: every step retries a failing store call with backoff, and a
pipeline that still fails hands its record to the archive sweep (`stranded`),
which finishes it; every hook call has a timeout; every write after the spawn is
conditional (a record removed by a sweep is never re-inserted); on a shared
store a process holds a claim on each record it works on, and the sweep of
another process skips it; the maintenance tick never waits for a hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

import msgspec
import structlog

from clawgate.agent.tools import SESSIONS_SPAWN_SPEC, Tool, ToolCallContext
from clawgate.clip import clip
from clawgate.errors import ClawgateError, Forbidden, InvalidRequest, StoreError, Unavailable
from clawgate.events.bus import EventBus
from clawgate.ids import RunId, SessionKey
from clawgate.protocol.schemas import SpawnParams
from clawgate.runs.service import INTERRUPTED, RunService, SubmitRequest
from clawgate.sessions.keys import agent_id_of, is_subagent, subagent_key
from clawgate.sessions.service import SessionService
from clawgate.settings import Settings
from clawgate.state.clock import Clock, Timer
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap
from clawgate.store.base import Store
from clawgate.store.records import RunRecord, SubagentRecord, TranscriptMessage
from clawgate.subagents import attachments, rules
from clawgate.subagents.hooks import JsonlEndedHook, SubagentEnded, SubagentEndedHook, call_hook

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


class SubagentService:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        store: Store,
        bus: EventBus,
        sessions: SessionService,
        runs: RunService,
    ) -> None:
        self.settings = settings
        self.clock = clock
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
        registry.add_sweep("subagent_archive", self.sweep_store)
        # One pipeline task per run at most: a run can be finalized from several places
        # (its end hook, the grace timer, the pending-error sweep, restore), and a second
        # concurrent pipeline would announce and report twice (rule 7).
        # `_start_pipeline` never lets it reach its bound (it defers instead), so nothing here
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
        runs.tools[SESSIONS_SPAWN_SPEC.name] = Tool(SESSIONS_SPAWN_SPEC, self._tool_spawn)
        runs.start_hooks.append(self._on_run_start)
        runs.end_hooks.append(self._on_run_end)
        bus.listeners.append(self._on_event)
        self._stopping = False
        self._restoring = False

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False

    async def stop(self) -> None:
        self._stopping = True
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

    def _start_pipeline(
        self, run_id: RunId, make: Callable[[], Coroutine[Any, Any, None]], name: str
    ) -> bool:
        """Start the pipeline of `run_id` unless one is already in flight (or we are stopping).

        At the `subagent_tasks` bound the start is deferred until a task ends, never dropped.
        """
        if self._stopping or run_id in self.pipelines or run_id in self.deferred:
            return False
        if len(self.tasks) >= self.max_tasks:
            self.pipelines_deferred += 1
            log.warning("subagent pipeline deferred: task bound reached", run_id=run_id)
            self.deferred.set(run_id, (make, name))
            return True
        task = asyncio.create_task(self._guarded(run_id, make), name=name)
        self.pipelines.set(run_id, task)
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(run_id, t))
        return True

    def _task_done(self, run_id: RunId, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.pipelines.get(run_id) is task:
            self.pipelines.pop(run_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("subagent pipeline failed", task=task.get_name(), error=repr(task.exception()))
        while self.deferred and len(self.tasks) < self.max_tasks and not self._stopping:
            next_id = next(self.deferred.keys())
            entry = self.deferred.pop(next_id)
            if entry is not None:
                self._start_pipeline(next_id, *entry)

    async def _guarded(self, run_id: RunId, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a pipeline; one that fails for good leaves its record to the archive sweep."""
        try:
            await make()
        except Superseded:
            rec = self.active.get(run_id)
            if rec is not None:
                self._untrack(rec)
        except Exception as exc:
            self.pipeline_failures += 1
            log.error(
                "subagent pipeline gave up; the archive sweep finishes it", run_id=run_id, error=repr(exc)
            )
            rec = self.active.get(run_id)
            if rec is not None:
                self._strand(rec)

    def _strand(self, rec: SubagentRecord) -> None:
        # Due now: the next sweep reports what was not reported and removes the record.
        rec.expires_at = self.clock.time()
        self._untrack(rec)
        self.stranded.set(RunId(rec.run_id), rec)

    def _on_pipeline_evicted(self, run_id: RunId, task: asyncio.Task[None], why: str) -> None:
        log.error("subagent pipeline entry evicted", run_id=run_id, why=why)

    def _on_deferred_evicted(self, run_id: RunId, entry: object, why: str) -> None:
        rec = self.active.get(run_id)
        log.error("deferred subagent pipeline evicted; left to the archive sweep", run_id=run_id, why=why)
        if rec is not None:
            self._strand(rec)

    def _on_stranded_evicted(self, run_id: RunId, rec: SubagentRecord, why: str) -> None:
        # Its stored row is still live: the next start resumes it.
        log.error("stranded subagent record evicted from memory", run_id=run_id, why=why)

    # -- store steps: retried, conditional, claimed --------------------------------------------------
    async def _retry(self, step: str, rec: SubagentRecord, fn: Callable[[], Awaitable[T]]) -> T:
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

    async def _hold(self, rec: SubagentRecord) -> None:
        """Take or renew this process' claim on the record (a no-op on a one-process store)."""
        if not await self.store.claim_subagent(rec.run_id, self.owner, self.clock.time(), self.lease_s):
            raise Superseded(rec.run_id)

    async def _save(self, rec: SubagentRecord) -> None:
        await self._hold(rec)
        if not await self.store.update_subagent(rec):
            raise Superseded(rec.run_id)  # swept meanwhile: never re-inserted

    async def _release(self, rec: SubagentRecord) -> None:
        with contextlib.suppress(ClawgateError, OSError):
            await self.store.release_subagent(rec.run_id, self.owner)

    # -- spawn ------------------------------------------------------------------------------------------
    async def depth_of(self, session_key: str) -> int:
        if not is_subagent(session_key):
            return 0
        run_id = self.by_child.get(SessionKey(session_key))
        rec = self.active.get(run_id) if run_id is not None else None
        if rec is not None:
            return rec.depth
        # Untracked (its pipeline is done, or its record swept): the depth kept with the session.
        meta = await self.sessions.get(SessionKey(session_key))
        return meta.depth if meta is not None and meta.depth > 0 else 1

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

    async def spawn(self, params: SpawnParams, scopes: frozenset[str] | None = None) -> dict[str, Any]:
        """`scopes`: the spawning run's (the tool) or None (the RPC: the child gets the default)."""
        requester = SessionKey(params.session_key)
        # The child's profile must exist; the requester's profile sets the subagent limits.
        self.runs.profiles.require(params.agent_id or agent_id_of(requester), "agentId")
        limits = self.runs.profiles.get(agent_id_of(requester)) or self.runs.profiles.require(
            "main", "sessionKey"
        )
        max_depth, max_children = limits.max_spawn_depth, limits.max_children_per_agent
        run_id = RunId(str(uuid.uuid4()))
        key = params.idempotency_key
        if key:
            # Deduplication comes before the limits: a retry of an accepted spawn gets its
            # runId back even when the requester is now at maxChildrenPerAgent.
            known = self.spawn_keys.get(key)
            if known is None:
                # Bind the key to this attempt's run id atomically, so of two concurrent
                # spawns with one key (or a retry after a restart) exactly one goes ahead.
                claimed = await self.store.claim_key(
                    f"spawn:{key}", run_id, self.settings.dedupe_ttl_s, self.clock.time()
                )
                known = RunId(claimed) if claimed else None
                if known is None:
                    self.spawn_keys.set(key, run_id)
            if known is not None:
                existing = self.active.get(known) or await self.store.get_subagent(known)
                if existing is not None:
                    return _accepted(existing)
                # The key names a spawn that was refused or is already swept: this one goes ahead.
                self.spawn_keys.set(key, run_id)
        depth = await self.depth_of(requester) + 1
        files = attachments.prepare(
            params.attachments or [], self.settings.attachments_max_bytes, self.settings.attachments_max_files
        )
        # From here to `_track` nothing awaits: the limits and the reservation of the slot are
        # one step, so two concurrent spawns cannot both pass them.
        if self.admission_check is not None:
            self.admission_check()
        if depth > max_depth:
            raise Forbidden(
                f"spawn depth {depth} exceeds maxSpawnDepth {max_depth}",
                details={"depth": depth, "maxSpawnDepth": max_depth},
            )
        children = self.active_children(requester)
        if children >= max_children:
            raise Forbidden(
                f"{clip(requester)} already has {children} active children (maxChildrenPerAgent "
                f"{max_children})",
                details={
                    "activeChildren": children,
                    "maxChildrenPerAgent": max_children,
                },
            )
        agent_id = params.agent_id or agent_id_of(requester)
        child = subagent_key(agent_id)
        now = self.clock.time()
        rec = SubagentRecord(
            run_id=run_id,
            child_session_key=child,
            requester_session_key=requester,
            task=params.task,
            agent_id=agent_id,
            label=params.label or "",
            mode=params.mode,
            cleanup=params.cleanup,
            model=params.model,
            run_timeout_s=params.run_timeout_seconds,
            depth=depth,
            created_at=now,
        )
        message = params.task
        if files:
            message += "\n\nAttachments: " + ", ".join(name for name, _ in files)
        self._track(rec)
        self.spawns_in_flight += 1
        try:
            if files:
                await self._write_attachments(rec, child, files)
            await self.store.put_subagent(rec)
            # The announce only lands in an existing session (a deleted one is never
            # re-created), so the requester's session exists from the spawn on.
            if await self.sessions.get(requester) is None:
                await self.sessions.touch(requester)
            if depth > 1:
                # The depth lives with the child session too: it outlives the record's sweep
                # (an unknown depth reads as 1, so depth 1 needs no write).
                await self.sessions.touch(child, known_new=True, depth=depth)
            await self.runs.submit(
                SubmitRequest(
                    run_id=run_id,
                    session_key=child,
                    agent_id=agent_id,
                    message=message,
                    kind="subagent",
                    model=params.model,
                    timeout_s=params.run_timeout_seconds,
                    known_new_session=True,
                    webhook=params.webhook,
                    scopes=scopes,
                )
            )
        except BaseException:
            self._untrack(rec)
            await attachments.discard(rec.attachments_dir)
            with contextlib.suppress(ClawgateError):
                await self.store.delete_subagent(run_id)
                await self.sessions.delete(child)
            raise
        finally:
            self.spawns_in_flight -= 1
        # Before any await: the child cannot have started yet, so `spawned` precedes `ended`.
        self._event(rec, "spawned")
        return _accepted(rec)

    async def _write_attachments(
        self, rec: SubagentRecord, child: str, files: list[tuple[str, bytes]]
    ) -> None:
        run_id = rec.run_id
        try:
            # Off the event loop: file creation is blocking I/O, and slow on a busy disk. After
            # `_track`, so the spawn's limits and slot reservation stay one synchronous step.
            written = await asyncio.to_thread(
                attachments.write, self.attachments_root, run_id, files, owner=child
            )
        except OSError as exc:
            # E.g. ELOOP: a link planted in the state dir, which is not followed.
            await attachments.discard(str(self.attachments_root / run_id))
            log.error("cannot write attachments", run_id=run_id, error=exc.strerror)
            raise Unavailable(f"cannot store attachments: {exc.strerror}", retry_after_ms=1000) from None
        except BaseException:
            await attachments.discard(str(self.attachments_root / run_id))
            raise
        rec.attachments_dir = str(written)

    async def _tool_spawn(self, ctx: ToolCallContext, args: dict[str, Any]) -> dict[str, Any]:
        try:
            params = msgspec.convert({**args, "sessionKey": ctx.session_key}, SpawnParams)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"invalid sessions_spawn arguments: {exc}") from None
        return await self.spawn(params, scopes=ctx.scopes)

    def _track(self, rec: SubagentRecord) -> None:
        run_id = RunId(rec.run_id)
        self.active.set(run_id, rec)
        self.by_child.set(SessionKey(rec.child_session_key), run_id)
        requester = SessionKey(rec.requester_session_key)
        ids = self.by_requester.get(requester)
        if ids is None:
            self.by_requester.set(requester, {run_id})
        else:
            ids.add(run_id)

    def _untrack(self, rec: SubagentRecord) -> None:
        run_id = RunId(rec.run_id)
        self.active.pop(run_id)
        self.by_child.pop(SessionKey(rec.child_session_key))
        requester = SessionKey(rec.requester_session_key)
        ids = self.by_requester.get(requester)
        if ids is not None:
            ids.discard(run_id)
            if not ids:
                self.by_requester.pop(requester)
        self.announces.pop(run_id)
        pending = self.pending_errors.pop(run_id)
        if pending is not None and pending.timer is not None:
            pending.timer.cancel()

    # -- run lifecycle -----------------------------------------------------------------------------
    def _on_run_start(self, run: RunRecord) -> None:
        run_id = RunId(run.run_id)
        rec = self.active.get(run_id) if run.kind == "subagent" else None
        if rec is None:
            return
        # The backstop counts from the start, not the spawn (as `runs_active` does): a child
        # that waited long in the queue keeps its record for its whole run.
        self.active.touch(run_id)
        rec.status = "running"
        self.store.update_subagent(rec)

    def _on_event(self, run_id: RunId, key: SessionKey, stream: str, data: dict[str, Any]) -> None:
        if stream != "lifecycle" or not is_subagent(key):
            return
        phase = data.get("phase")
        if phase == "error" and data.get("willRetry"):
            # Held as pending: the run may recover (a later start clears it).
            self._set_pending(run_id, PendingError(str(data.get("error")), self.clock.time()))
        elif phase == "start":
            pending = self.pending_errors.pop(run_id)
            if pending is not None and pending.timer is not None:
                pending.timer.cancel()

    def _set_pending(self, run_id: RunId, pending: PendingError) -> None:
        old = self.pending_errors.pop(run_id)
        if old is not None and old.timer is not None:
            old.timer.cancel()
        self.pending_errors.set(run_id, pending)

    def _on_run_end(self, run: RunRecord) -> None:
        if run.kind != "subagent":
            return
        run_id = RunId(run.run_id)
        rec = self.active.get(run_id)
        if self._stopping:
            return
        if rec is None:
            # Not tracked here any more (its in-memory backstop fired): the stored record
            # still gets its end.
            self._start_pipeline(
                run_id,
                partial(self._finalize_stored, run_id, run.status, run.error, run.result_text),
                f"finalize:{run_id}",
            )
            return
        if rec.status == "ended":
            return
        if run.status == "error" and run.error != INTERRUPTED and self.settings.lifecycle_error_grace_s > 0:
            # A lifecycle error is held for the grace period before the run is finalized as error.
            pending = PendingError(run.error or "error", self.clock.time())
            self._set_pending(run_id, pending)
            pending.timer = self.clock.call_later(
                self.settings.lifecycle_error_grace_s, lambda: self._grace_over(run_id, run)
            )
            return
        self._start_pipeline(
            run_id,
            partial(self._finalize, rec, run.status, run.error, run.result_text, resumed=self._restoring),
            f"finalize:{run_id}",
        )

    def _grace_over(self, run_id: RunId, run: RunRecord) -> None:
        pending = self.pending_errors.pop(run_id)
        rec = self.active.get(run_id)
        if rec is None or rec.status == "ended":
            return
        error = pending.error if pending is not None else run.error
        self._start_pipeline(
            run_id, partial(self._finalize, rec, "error", error, run.result_text), f"finalize:{run_id}"
        )

    def _on_pending_expired(self, run_id: RunId, pending: PendingError, why: str) -> None:
        # Rule 4: swept 5 min after it was recorded, whatever happened to its grace timer.
        if pending.timer is not None:
            pending.timer.cancel()
        rec = self.active.get(run_id)
        if rec is not None and rec.status != "ended" and run_id not in self.runs.active:
            self._start_pipeline(
                run_id, partial(self._finalize, rec, "error", pending.error, None), f"finalize:{run_id}"
            )

    def _on_record_expired(self, run_id: RunId, rec: SubagentRecord, why: str) -> None:
        log.warning("subagent record hit its in-memory backstop", run_id=run_id, why=why)
        self.by_child.pop(SessionKey(rec.child_session_key))
        ids = self.by_requester.get(SessionKey(rec.requester_session_key))
        if ids is not None:
            ids.discard(run_id)
            if not ids:
                self.by_requester.pop(SessionKey(rec.requester_session_key))

    # -- the pipeline ----------------------------------------------------------------------------------
    async def _finalize_stored(
        self, run_id: RunId, outcome: str, error: str | None, text: str | None
    ) -> None:
        rec = await self._retry("load", _placeholder(run_id), lambda: self.store.get_subagent(run_id))
        if rec is None or rec.status == "ended" or run_id in self.active:
            return
        self._track(rec)
        await self._finalize(rec, outcome, error, text)

    async def _finalize(
        self, rec: SubagentRecord, outcome: str, error: str | None, text: str | None, *, resumed: bool = False
    ) -> None:
        if rec.status != "ended":
            rec.status = "ended"
            rec.outcome = outcome
            rec.error = error
            rec.ended_at = self.clock.time()
            rec.frozen_result = rules.freeze(text, self.settings.frozen_result_max_bytes)
            await self._retry("ended", rec, lambda: self._save(rec))
            self._event(rec, "ended", outcome=outcome)
        await self._continue(rec, resumed=resumed)

    async def _continue(self, rec: SubagentRecord, *, resumed: bool) -> None:
        """Run the remaining pipeline steps for an ended record (also used after a restart)."""
        await self._retry("claim", rec, lambda: self._hold(rec))
        if rec.announced_at is None and rec.ended_reason != "released":
            await self._announce(rec)
        if rec.cleanup_completed_at is None:
            await self._cleanup(rec)
        if rec.ended_reason is None:
            await self._report(rec, rules.cleanup_reason(rec))
        elif resumed and not rec.ended_notified:
            # Recorded before a crash, delivery not confirmed: deliver once more, flagged. In a
            # live pipeline a set reason means whoever set it (release) is delivering it.
            await self._deliver(rec, redelivery=True)
        self._untrack(rec)
        await self._release(rec)

    async def _announce(self, rec: SubagentRecord) -> None:
        run_id = RunId(rec.run_id)
        started = self.clock.time()
        self.announces.set(run_id, started)
        requester = SessionKey(rec.requester_session_key)
        text = rules.announce_text(rec)
        attempt = 0
        delivered = False
        while True:
            if rec.ended_reason == "released":
                break  # the requester was deleted meanwhile: nothing to announce into
            try:
                await self._hold(rec)
                # Appended only if the requester's session still exists, atomically with the
                # check: an announce in flight (or between retries) never re-creates a deleted
                # session or its transcript.
                delivered = await self.store.append_to_existing(
                    _announce_message(requester, text, rec.run_id, self.clock.time())
                )
                if not delivered:
                    log.info("announce dropped: requester session is gone", run_id=rec.run_id)
                break
            except (StoreError, OSError) as exc:
                attempt += 1
                self.announce_failures += 1
                now = self.clock.time()
                # The soft expiry counts from this attempt series; the hard one from the end,
                # so a pipeline resumed after a long downtime does not retry for another 5 min.
                ended = rec.ended_at if rec.ended_at is not None else started
                if (
                    now - started >= self.settings.announce_expiry_s
                    or now - ended >= self.settings.announce_hard_expiry_s
                ):
                    self.announces_expired += 1
                    log.warning("announce expired", run_id=rec.run_id, error=str(exc), attempts=attempt)
                    break
                await self.clock.sleep(rules.announce_delay(attempt, self.settings.announce_retry_delays_s))
        self.announces.pop(run_id)
        # Set even when the announce expired: the step is over either way, cleanup goes on.
        rec.announced_at = self.clock.time()
        await self._retry("announce", rec, lambda: self._save(rec))
        if delivered:
            self._event(rec, "announced", outcome=rec.outcome)

    async def _cleanup(self, rec: SubagentRecord) -> None:
        if rec.cleanup == "delete":
            child = SessionKey(rec.child_session_key)
            await self._retry("cleanup", rec, lambda: self.sessions.delete(child))
            await attachments.discard(rec.attachments_dir)
            rec.attachments_dir = None
        now = self.clock.time()
        rec.cleanup_completed_at = now
        rec.expires_at = rules.expiry_after_cleanup(rec, self._ttls())
        await self._retry("cleanup", rec, lambda: self._save(rec))
        self._event(rec, "cleaned", outcome=rec.outcome)

    async def _report(self, rec: SubagentRecord, reason: str, *, retry: bool = True) -> None:
        """Record the ended reason durably, then notify the hooks: once per run (rule 7)."""
        if rec.ended_reason is not None:
            return
        rec.ended_reason = reason  # type: ignore[assignment]
        rec.ended_notified = False
        await self._step("report", rec, retry)
        await self._deliver(rec, redelivery=False, retry=retry)

    async def _step(self, step: str, rec: SubagentRecord, retry: bool) -> None:
        if retry:
            await self._retry(step, rec, lambda: self._save(rec))
        else:
            await self._save(rec)

    async def _deliver(self, rec: SubagentRecord, *, redelivery: bool, retry: bool = True) -> None:
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
        timeout = self.settings.ended_hook_timeout_s
        for hook in self.hooks:
            # The claim is renewed before each hook, and outlasts its timeout.
            if retry:
                await self._retry("claim", rec, lambda: self._hold(rec))
            else:
                await self._hold(rec)
            outcome = await call_hook(hook, event, self.clock, timeout)
            if outcome == "timeout":
                # Abandoned, like a hook that raises: logged, counted, not re-delivered.
                self.hook_timeouts += 1
                log.error("subagent ended hook timed out", run_id=rec.run_id, timeout_s=timeout)
            elif outcome == "error":
                # A hook that raises is logged; the registry goes on (and does not re-deliver).
                self.hook_errors += 1
                log.error("subagent ended hook failed", run_id=rec.run_id)
        self.ended_reports += 1
        rec.ended_notified = True
        await self._step("delivered", rec, retry)

    def _ttls(self) -> rules.Ttls:
        return rules.Ttls(self.settings.subagent_session_ttl_s, self.settings.subagent_archive_after_s)

    def _event(self, rec: SubagentRecord, phase: str, outcome: str | None = None) -> None:
        payload: dict[str, Any] = {
            "runId": rec.run_id,
            "childSessionKey": rec.child_session_key,
            "requesterSessionKey": rec.requester_session_key,
            "phase": phase,
        }
        if outcome is not None:
            payload["outcome"] = outcome
        self.bus.emit_session_event(SessionKey(rec.requester_session_key), "subagent", payload)

    # -- scale-out (Redis) ------------------------------------------------------------------------
    async def adopt(self, run_id: str) -> None:
        """This process is about to execute (or orphan) a child run spawned by another process:
        track its record here so the end hook runs its pipeline."""
        if RunId(run_id) in self.active:
            return
        rec = await self.store.get_subagent(run_id)
        if rec is not None and rec.cleanup_completed_at is None:
            self._track(rec)

    def forget_remote(self, run_id: RunId) -> None:
        """Another process ended this child run and runs its pipeline: stop tracking it here."""
        rec = self.active.get(run_id)
        if rec is None or run_id in self.pipelines or run_id in self.pending_errors:
            return
        if run_id in self.runs.active:
            return  # still executing here
        self._untrack(rec)

    # -- release ---------------------------------------------------------------------------------------
    async def release_requester(self, requester: SessionKey) -> int:
        """The requester session is gone: its unfinished children are reported `released`."""
        released = 0
        for run_id in list(self.by_requester.get(requester) or ()):
            rec = self.active.get(run_id)
            if rec is None or rec.ended_reason is not None:
                continue
            if run_id in self.runs.active:
                self.runs.abort(run_id)
            try:
                # Within the request: one attempt per write, the caller gets a store error.
                await self._report(rec, "released", retry=False)
            except Superseded:
                continue  # removed, or another process works on it and reports it
            released += 1
        return released

    # -- the TTL sweep (store-backed) ---------------------------------------------------------------------
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
        failed += self.archive_failures
        self.archive_failures = 0
        removed = 0
        seen: set[str] = set()
        now = self.clock.time()
        batch = self.settings.subagent_sweep_batch
        while True:
            due = await self.store.due_subagents(now, batch)
            deletes: list[Awaitable[None]] = []
            progress = 0
            for rec in due:
                if rec.run_id in seen:
                    continue
                seen.add(rec.run_id)
                outcome = await self._sweep_due(rec, now)
                if outcome == "delete":
                    deletes.append(self.store.delete_subagent(rec.run_id))
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
        run_id = RunId(rec.run_id)
        # Rule 1: a record still in its pipeline is never removed (expiry is set at cleanup,
        # so this only happens when its last steps are still in flight).
        if run_id in self.active or run_id in self.pipelines or run_id in self.deferred:
            return "skip"
        if rules.sweep_needs_hook(rec) and len(self.tasks) >= self.max_tasks:
            return "skip"  # next tick
        try:
            if not await self.store.claim_subagent(rec.run_id, self.owner, now, self.lease_s):
                return "skip"  # another process works on it (or removed it)
            if self.store.shared_by_processes:
                fresh = await self.store.get_subagent(rec.run_id)
                if fresh is None or fresh.expires_at is None or fresh.expires_at > now:
                    await self._release(rec)
                    return "skip"
                rec = fresh
        except (StoreError, OSError) as exc:
            self.sweep_errors += 1
            log.error("subagent sweep could not claim a record", run_id=rec.run_id, error=repr(exc))
            return "failed"
        if rules.sweep_needs_hook(rec):
            self._start_pipeline(run_id, partial(self._archive, rec), f"archive:{run_id}")
            return "handed"
        try:
            await self._sweep_one(rec)
        except Exception as exc:
            self.sweep_errors += 1
            # One line per record, no traceback: a batch failing together must not flood the log.
            log.error("subagent sweep failed for a record", run_id=rec.run_id, error=repr(exc))
            return "postponed" if await self._postpone(rec, now) else "failed"
        return "delete"

    async def _archive(self, rec: SubagentRecord) -> None:
        """Archive work that calls the hooks, off the tick (its claim is held)."""
        try:
            await self._sweep_one(rec)
            await self.store.delete_subagent(rec.run_id)
        except (StoreError, OSError, Superseded):
            self.sweep_errors += 1
            self.archive_failures += 1
            log.exception("subagent archive failed for a record", run_id=rec.run_id)
            await self._postpone(rec, self.clock.time())

    async def _postpone(self, rec: SubagentRecord, now: float) -> bool:
        """Count a failed archive; from the second one in a row the record moves behind the others."""
        rec.sweep_failures += 1
        delay = rules.sweep_retry_delay(rec.sweep_failures)
        if rec.expires_at is not None:
            rec.expires_at = max(rec.expires_at, now + delay)
        try:
            await self.store.update_subagent(rec)
        except (StoreError, OSError):
            return False
        finally:
            await self._release(rec)
        return delay > 0

    async def _persist_stranded(self) -> int:
        """Write the records of failed pipelines (due now) so the sweep below finishes them."""
        failed = 0
        for run_id, rec in list(self.stranded.items()):
            try:
                # A record gone from the store has nothing left to finish.
                await self.store.update_subagent(rec)
            except (StoreError, OSError):
                failed += 1
                continue
            self.stranded.pop(run_id)
        return failed

    async def _sweep_one(self, rec: SubagentRecord) -> None:
        if rules.sweep_deletes_child_session(rec) or rules.sweep_finishes_cleanup(rec):
            await self.sessions.delete(SessionKey(rec.child_session_key))
        if rules.sweep_removes_attachments(rec, self.settings.retain_attachments_on_keep):
            await attachments.discard(rec.attachments_dir)
        reason = rules.sweep_reason(rec)
        if reason is not None:
            await self._report(rec, reason, retry=False)
        elif not rec.ended_notified:
            await self._deliver(rec, redelivery=True, retry=False)

    # -- restore --------------------------------------------------------------------------------------------
    async def load(self) -> int:
        """Before runs are restored: bring live records back into memory."""
        self._restoring = True
        live = await self.store.live_subagents()
        for rec in live:
            self._track(rec)
        return len(live)

    async def resume(self) -> int:
        """After runs are restored: end what has no live run, continue every unfinished pipeline."""
        resumed = 0
        try:
            for rec in list(self.active.values()):
                run_id = RunId(rec.run_id)
                if run_id in self.pipelines or run_id in self.pending_errors:
                    continue  # already being finalized (e.g. its run was ended by the run restore)
                if rec.status != "ended":
                    if run_id in self.runs.active:
                        continue  # re-queued: it will run and end normally
                    _run, run_rec = await self.runs.lookup(run_id)
                    if run_rec is not None and run_rec.is_final and run_rec.error != INTERRUPTED:
                        outcome, error, text = run_rec.status, run_rec.error, run_rec.result_text
                    else:
                        outcome, error, text = "error", INTERRUPTED, None
                    self._start_pipeline(
                        run_id,
                        partial(self._finalize, rec, outcome, error, text, resumed=True),
                        f"finalize:{run_id}",
                    )
                else:
                    self._start_pipeline(
                        run_id, partial(self._continue, rec, resumed=True), f"resume:{run_id}"
                    )
                resumed += 1
        finally:
            self._restoring = False
        return resumed

    async def restore(self) -> int:
        return len(self.active)

    async def list(self, requester: str | None, limit: int) -> list[SubagentRecord]:
        stored = await self.store.list_subagents(requester, limit)
        live = {
            r.run_id: r
            for r in self.active.values()
            if requester is None or r.requester_session_key == requester
        }
        out = [live.pop(r.run_id, r) for r in stored]
        out.extend(live.values())
        return out[:limit]


def _placeholder(run_id: str) -> SubagentRecord:
    """A record that only names a run id (for log lines before the record is loaded)."""
    return SubagentRecord(run_id=run_id, child_session_key="", requester_session_key="", task="")


def _accepted(rec: SubagentRecord) -> dict[str, Any]:
    return {"status": "accepted", "runId": rec.run_id, "childSessionKey": rec.child_session_key}


def _announce_message(requester: SessionKey, text: str, run_id: str, now: float) -> TranscriptMessage:
    return TranscriptMessage(session_key=requester, role="system", content=text, ts=now, run_id=run_id)
