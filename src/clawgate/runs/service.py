"""The run service: accept, queue, execute, time out, abort, finish, remember results.

Records and their lives (DESIGN.md section 3):
  - `runs_active`  (Run, per run):  accepted -> ended; deadline = timeout + grace, clamped,
                                   so even a run whose end is lost cannot stay forever.
  - `run_results`  (RunRecord):     ended -> run_result_ttl_s (max run_result_max), for
                                   `agent.wait` and idempotent retries.
  - `session_lanes`, `lane_workers`: exist only while a session has work.
  - run contexts and watchers live in the event bus and end with the run.
A run is durable (in the store) before it is acknowledged as accepted, and its
end is durable before the final response is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from clawgate.agent.loop import AgentInput, run_agent
from clawgate.agent.tools import Tool
from clawgate.errors import NotFound, ProviderError, Unavailable
from clawgate.events.bus import EventBus
from clawgate.ids import ConnId, RunId, SessionKey
from clawgate.metrics import LatencyHistogram
from clawgate.providers.base import ChatMessage, Provider
from clawgate.runs.lanes import Lanes
from clawgate.sessions.service import SessionService
from clawgate.settings import Settings
from clawgate.state.clock import Clock, Timer
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap
from clawgate.store.base import Fence, Store
from clawgate.store.records import RunRecord

log = structlog.get_logger("clawgate.runs")

INTERRUPTED = "interrupted by gateway restart"

FinalListener = Callable[[RunRecord], None]
EndHook = Callable[[RunRecord], Awaitable[None] | None]
StartHook = Callable[[RunRecord], None]


class Run:
    """A run while it is tracked in memory (queued or running)."""

    __slots__ = ("cancel_reason", "fence", "listeners", "record", "task", "timer", "waiting")

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.listeners: list[FinalListener] = []
        self.task: asyncio.Task[None] | None = None
        self.timer: Timer | None = None
        self.cancel_reason: str | None = None  # "aborted" | "timeout" | "shutdown"
        # Out of its session lane but waiting for a slot of the global (or subagent) lane:
        # still queued as far as status and admission are concerned.
        self.waiting = False
        # Set when executed from the shared Redis queue: the session lease the end write
        # depends on (a process that lost it can no longer end the run).
        self.fence: Fence | None = None


@dataclass
class SubmitRequest:
    run_id: RunId
    session_key: SessionKey
    agent_id: str
    message: str
    kind: str = "main"
    model: str | None = None
    timeout_s: float | None = None
    extra_system_prompt: str | None = None
    owner: ConnId | None = None
    known_new_session: bool = False


class RunService:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        store: Store,
        bus: EventBus,
        sessions: SessionService,
        provider: Provider,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.bus = bus
        self.sessions = sessions
        self.provider = provider
        cap = settings.max_tracked_runs
        self.active: TTLMap[RunId, Run] = TTLMap(
            "runs_active",
            clock,
            ttl_s=settings.abort_ttl_max_s,
            max_size=cap,
            lru=False,
            on_expire=self._on_active_expired,
        )
        self.results: TTLMap[RunId, RunRecord] = TTLMap(
            "run_results", clock, ttl_s=settings.run_result_ttl_s, max_size=settings.run_result_max
        )
        registry.register(self.active, per_run=True)
        registry.register(self.results)
        self.lanes: Lanes[Run] = Lanes(
            clock, registry, max_lanes=cap, execute=self._execute, on_task_error=self._task_error
        )
        self.main_lane = asyncio.Semaphore(settings.main_concurrency)
        self.subagent_lane = asyncio.Semaphore(settings.subagent_concurrency)
        self.tools: dict[str, Tool] = {}
        self.start_hooks: list[StartHook] = []
        self.end_hooks: list[EndHook] = []
        self.accepting = True
        self.draining = False
        self.running = 0
        self.waiting = 0  # runs out of their session lane, waiting for a global lane slot
        self.totals: dict[str, int] = {"ok": 0, "error": 0, "timeout": 0, "aborted": 0}
        self.latency = LatencyHistogram()
        self.task_errors = 0
        # Ends this process tried to write and the store refused: the run already had an end,
        # or this process had lost the run's lease (runs/cluster.py). Logged, never raised.
        self.ends_refused = 0
        # Scale-out hooks, set by runs/cluster.py when the store is Redis: accepted runs go to
        # the shared queue instead of the local lanes; aborts and final answers cross processes.
        self.dispatch: Callable[[Run], Awaitable[None]] | None = None
        self.remote_abort: Callable[[str], None] | None = None
        self.remote_listen: Callable[[RunId, FinalListener], Callable[[], None]] | None = None

    # -- accept ---------------------------------------------------------------------------
    async def submit(self, req: SubmitRequest) -> tuple[Run | None, RunRecord, bool]:
        """Accept a run. Returns (live run or None, record, created)."""
        if not self.accepting:
            raise Unavailable("gateway is shutting down", retry_after_ms=2000)
        existing = self.active.get(req.run_id)
        if existing is not None:
            if req.owner is not None:
                self.bus.watch(req.run_id, req.owner, ttl_s=self.settings.abort_ttl_max_s)
            return existing, existing.record, False
        cached = self.results.get(req.run_id)
        now = self.clock.time()
        if cached is not None and cached.accepted_at + self.settings.dedupe_ttl_s > now:
            return None, cached, False
        record = RunRecord(
            run_id=req.run_id,
            session_key=req.session_key,
            agent_id=req.agent_id,
            message=req.message,
            kind="subagent" if req.kind == "subagent" else "main",
            model=req.model,
            timeout_s=req.timeout_s or self.settings.default_run_timeout_s,
            extra_system_prompt=req.extra_system_prompt,
            accepted_at=now,
        )
        run = Run(record)
        # Track before the durable insert so a concurrent retry of the same key joins this run.
        self.active.set(req.run_id, run)
        try:
            prior = await self.store.create_run(record, reuse_after_s=self.settings.dedupe_ttl_s, now=now)
        except BaseException:
            self.active.pop(req.run_id)
            raise
        if prior is not None:
            self.active.pop(req.run_id)
            # A concurrent retry may have joined `run` while the insert was in flight: it
            # follows the prior run instead, and must not wait forever for a run never queued.
            run.record = prior
            if prior.is_final:
                self._settle(run)
            return None, prior, False
        if req.owner is not None:
            # Watchers live as long as the run may (the same backstop as `runs_active`), not
            # the idle TTL of a context: a run may wait in its lane longer than that.
            self.bus.watch(req.run_id, req.owner, ttl_s=self.settings.abort_ttl_max_s)
        if self.dispatch is not None:
            try:
                await self.dispatch(run)
            except BaseException:
                # Not queued anywhere: end it now rather than leave an accepted run without an end.
                await self._finish(run, "error", "could not queue the run", None)
                raise
        else:
            self.lanes.push(req.session_key, run)
        return run, record, True

    def adopt(self, record: RunRecord) -> Run:
        """Track a run accepted by another process, which this process is about to execute."""
        run = Run(record)
        self.active.set(RunId(record.run_id), run)
        return run

    async def execute(self, run: Run) -> None:
        """Execute one run now (the shared queue already serialized its session)."""
        await self._execute(run)

    def settle_remote(self, rec: RunRecord) -> None:
        """Another process ended a run this one accepted: answer the local waiters."""
        run = self.active.get(RunId(rec.run_id))
        if run is None or run.task is not None or run.record.is_final:
            return
        run.record = rec
        self.active.pop(RunId(rec.run_id))
        self.results.set(RunId(rec.run_id), rec)
        self._settle(run)

    def follow(self, run: Run, listener: FinalListener) -> None:
        """Call `listener` with the end of `run`, as returned by `submit`. On Redis the run can
        end in another process, and its end be settled here, while `submit` still awaits the
        push: a listener added after that is called at once instead of never."""
        if run.record.is_final and self.active.get(RunId(run.record.run_id)) is not run:
            listener(run.record)
        else:
            run.listeners.append(listener)

    def listen_final(self, run_id: RunId, rec: RunRecord, listener: FinalListener) -> bool:
        """Call `listener` once the run ends, wherever it runs. False if it cannot be followed."""
        run = self.active.get(run_id)
        if run is not None:
            run.listeners.append(listener)
            return True
        if rec.is_final:
            listener(rec)
            return True
        if self.remote_listen is not None:
            self.remote_listen(run_id, listener)
            return True
        return False

    def enqueue_restored(self, record: RunRecord) -> None:
        """Re-queue a run that was accepted but never started before a restart."""
        run = Run(record)
        self.active.set(RunId(record.run_id), run)
        self.lanes.push(SessionKey(record.session_key), run)

    # -- execute -------------------------------------------------------------------------------
    def _startable(self, run: Run) -> bool:
        # An abort or timeout of a queued run finishes it in another task; `cancel_reason` is
        # set at once, so a run is never started between that request and its end.
        return not (run.record.is_final or run.cancel_reason is not None or self.draining)

    def _stop_waiting(self, run: Run) -> None:
        if run.waiting:
            run.waiting = False
            self.waiting -= 1

    async def _execute(self, run: Run) -> None:
        if not self._startable(run):  # aborted while queued, or shutting down
            return
        lane = self.subagent_lane if run.record.kind == "subagent" else self.main_lane
        run.waiting = True
        self.waiting += 1
        try:
            await lane.acquire()
        finally:
            self._stop_waiting(run)
        try:
            if not self._startable(run):
                return
            run.task = asyncio.current_task()
            try:
                await self._run(run)
            except asyncio.CancelledError:
                if run.cancel_reason is None:
                    raise
                # The timeout / abort cancelled us: uncancel so the lane goes on.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                await self._finish(
                    run, _cancel_status(run.cancel_reason), _cancel_message(run.cancel_reason), None
                )
            finally:
                run.task = None
                if run.timer is not None:
                    run.timer.cancel()
        finally:
            lane.release()

    async def _run(self, run: Run) -> None:
        rec = run.record
        run_id, key = RunId(rec.run_id), SessionKey(rec.session_key)
        now = self.clock.time()
        rec.status = "running"
        rec.started_at = now
        self.running += 1
        try:
            self.active.touch(run_id, self.settings.abort_ttl_s(rec.timeout_s))
            self.bus.extend_watch(run_id, self.settings.abort_ttl_s(rec.timeout_s))
            run.timer = self.clock.call_later(rec.timeout_s, lambda: self._timeout(run))
            self.store.put_run(rec)
            self.bus.register_run(run_id, key)
            for hook in self.start_hooks:
                hook(rec)
            self.bus.emit_agent(run_id, key, "lifecycle", {"phase": "start", "startedAt": int(now * 1000)})
            await self.sessions.touch(key, known_new=rec.kind == "subagent")
            history = await self._history(key)
            self.sessions.append(key, "user", rec.message, rec.run_id)
            emitter = _Emitter(self.bus, run_id, key, self.clock)
            try:
                text = await run_agent(
                    self.provider,
                    AgentInput(
                        run_id=rec.run_id,
                        session_key=key,
                        agent_id=rec.agent_id,
                        message=rec.message,
                        history=history,
                        model=rec.model,
                        system_prompt=rec.extra_system_prompt,
                    ),
                    emitter,
                    self._tools_for(rec),
                    max_tool_rounds=self.settings.max_tool_rounds,
                    max_retries=self.settings.provider_max_retries,
                )
            except ProviderError as exc:
                await self._finish(run, "error", exc.message, emitter.text or None)
                return
            except Exception as exc:
                # Anything else (a store error reading history, a tool that crashed) ends this
                # run as error; letting it escape would kill the lane worker and strand every
                # run queued behind it in the session.
                log.exception("run failed", run_id=rec.run_id)
                await self._finish(run, "error", f"{type(exc).__name__}: {exc}", emitter.text or None)
                return
            await self._finish(run, "ok", None, text)
        finally:
            self.running -= 1

    def _tools_for(self, rec: RunRecord) -> Mapping[str, Tool]:
        return self.tools

    async def _history(self, key: SessionKey) -> list[ChatMessage]:
        messages = await self.sessions.history(key, self.settings.transcript_history_max)
        return [
            ChatMessage(role=m.role if m.role in ("user", "assistant") else "user", content=m.content)
            for m in messages
        ]

    # -- end ------------------------------------------------------------------------------------
    async def _finish(self, run: Run, status: str, error: str | None, text: str | None) -> None:
        rec = run.record
        if rec.is_final:
            return
        before = msgspec.structs.replace(rec)
        key = SessionKey(rec.session_key)
        now = self.clock.time()
        # Final at once (before the first await), so no second end starts in this process.
        rec.status = status  # type: ignore[assignment]
        rec.ended_at = now
        rec.error = error
        rec.result_text = text
        if rec.started_at is not None:
            rec.duration_ms = int((now - rec.started_at) * 1000)
        if run.timer is not None:
            run.timer.cancel()
        stored, cancelled = await self._write_end(run)
        if stored is not rec:
            self._end_refused(run, before, stored)
        else:
            await self._ended(run, key, now, text)
        if cancelled:
            raise asyncio.CancelledError

    async def _write_end(self, run: Run) -> tuple[RunRecord | None, bool]:
        """Write the end (fenced when the run came from the shared queue). A cancellation
        meanwhile (a lost lease, shutdown) does not cut the end in half: the write is awaited
        to its outcome and the end completed; (stored end, cancelled) tells the caller."""
        rec = run.record
        write = asyncio.ensure_future(self.store.end_run(rec, run.fence))
        cancelled = False
        while True:
            try:
                return await asyncio.shield(write), cancelled
            except asyncio.CancelledError:
                if write.cancelled():
                    raise
                cancelled = True
            except Exception:
                # The run still ends here (waiters, events, hooks): better than no end at all.
                log.exception("could not persist run end", run_id=rec.run_id)
                return rec, cancelled

    async def _ended(self, run: Run, key: SessionKey, now: float, text: str | None) -> None:
        """The end is durable and it is this one: tell everyone."""
        rec = run.record
        run_id = RunId(rec.run_id)
        if rec.status == "ok" and text:
            self.sessions.append(key, "assistant", text, rec.run_id)
        self._emit_end(rec, run_id, key, now)
        self.bus.clear_run(run_id)
        self.totals[rec.status] = self.totals.get(rec.status, 0) + 1
        if rec.duration_ms is not None:
            self.latency.observe(rec.duration_ms / 1000)
        if self.active.get(run_id) is run:
            self.active.pop(run_id)
        self.results.set(run_id, rec)
        # End hooks are called in the same step as the run leaves `runs_active`: what they
        # start (the subagent pipeline) must exist the moment it does, or an observer could
        # see no run and no pipeline while the end is still being processed.
        pending = self._call_end_hooks(rec)
        self._settle(run)
        for result in pending:
            try:
                await result
            except Exception:
                log.exception("run end hook failed", run_id=rec.run_id)

    def _end_refused(self, run: Run, before: RunRecord, stored: RunRecord | None) -> None:
        """The store kept another end, or this process lost the run's lease: no events, no
        hooks from here. Waiters here get the run's real end, now or when it is written."""
        run_id = RunId(before.run_id)
        self.ends_refused += 1
        self.bus.clear_run(run_id)
        if stored is not None:
            log.info("run end refused: the run already has an end", run_id=run_id, status=stored.status)
            run.record = stored
            if self.active.get(run_id) is run:
                self.active.pop(run_id)
            self.results.set(run_id, stored)
            self._settle(run)
            return
        log.warning("run end refused: this process lost the run's lease", run_id=run_id)
        # Tracked as a run executed elsewhere from now on: the lease holder ends it, and that
        # end reaches this process's waiters (the "done" message, or the store reconcile).
        run.record = before

    def _call_end_hooks(self, rec: RunRecord) -> list[Awaitable[None]]:
        pending: list[Awaitable[None]] = []
        for hook in self.end_hooks:
            try:
                result = hook(rec)
            except Exception:
                log.exception("run end hook failed", run_id=rec.run_id)
                continue
            if result is not None:
                pending.append(result)
        return pending

    def _settle(self, run: Run) -> None:
        listeners, run.listeners = run.listeners, []
        for listener in listeners:
            try:
                listener(run.record)
            except Exception:
                log.exception("final listener failed", run_id=run.record.run_id)
        self.bus.unwatch_run(RunId(run.record.run_id))

    def _emit_end(self, rec: RunRecord, run_id: RunId, key: SessionKey, now: float) -> None:
        ended_ms = int(now * 1000)
        if rec.status == "ok" or rec.status == "aborted":
            data: dict[str, Any] = {"phase": "end", "endedAt": ended_ms}
            if rec.status == "aborted":
                data["aborted"] = True
            self.bus.emit_agent(run_id, key, "lifecycle", data)
        else:
            self.bus.emit_agent(
                run_id,
                key,
                "lifecycle",
                {"phase": "error", "endedAt": ended_ms, "error": rec.error or rec.status},
            )
        if rec.status == "ok":
            self.bus.emit_chat(run_id, key, "final", message=_chat_message(rec.result_text or "", now))
        elif rec.status == "aborted":
            self.bus.emit_chat(run_id, key, "aborted")
        else:
            self.bus.emit_chat(run_id, key, "error", errorMessage=rec.error or rec.status)

    # -- abort / timeout ------------------------------------------------------------------------
    def _cancel(self, run: Run, reason: str) -> bool:
        if run.record.is_final or run.cancel_reason is not None:
            return False
        run.cancel_reason = reason
        if run.task is not None:
            run.task.cancel()
            return True
        # Still queued: drop it from its lane (or stop counting it as waiting for a global
        # slot; its worker returns when it gets one) and finish it right away.
        self.lanes.remove(SessionKey(run.record.session_key), run)
        self._stop_waiting(run)
        task = asyncio.create_task(
            self._finish(run, _cancel_status(reason), _cancel_message(reason), None),
            name=f"finish:{run.record.run_id}",
        )
        task.add_done_callback(_log_task_error)
        return True

    def _timeout(self, run: Run) -> None:
        self._cancel(run, "timeout")

    def abort(self, run_id: RunId) -> bool:
        run = self.active.get(run_id)
        if run is None:
            if self.results.get(run_id) is None:
                raise NotFound(f"unknown run {run_id}", details={"runId": run_id})
            return False
        if run.task is None and self.remote_abort is not None:
            # It may be executing in another process: ask every process; the executor cancels it.
            # Ending it here too means a run still waiting in the shared queue is skipped.
            self.remote_abort(run_id)
        return self._cancel(run, "aborted")

    def _on_active_expired(self, run_id: RunId, run: Run, why: str) -> None:
        # Backstop: a run past timeout + grace that somehow never ended is ended, not leaked;
        # through the normal end path, so its events, waiters and record all see the end.
        if why != "expired" or run.record.is_final:
            return
        log.warning("run exceeded its abort deadline", run_id=run_id)
        if not self._cancel(run, "timeout") and run.task is not None:
            run.task.cancel()

    # -- waiting ----------------------------------------------------------------------------------
    async def lookup(self, run_id: RunId) -> tuple[Run | None, RunRecord | None]:
        run = self.active.get(run_id)
        if run is not None:
            return run, run.record
        rec = self.results.get(run_id)
        if rec is None:
            rec = await self.store.get_run(run_id)
        return None, rec

    async def wait(self, run_id: RunId, timeout_s: float) -> RunRecord | None:
        """The final record, or None if the run is still going when the wait times out."""
        run, rec = await self.lookup(run_id)
        if run is None:
            if rec is None:
                raise NotFound(f"unknown or expired run {run_id}", details={"runId": run_id})
            if rec.is_final or timeout_s <= 0 or self.remote_listen is None:
                return rec if rec.is_final else None
            return await self._wait_remote(run_id, timeout_s)
        if timeout_s <= 0:
            return None
        if run.task is None and self.remote_listen is not None:
            return await self._wait_remote(run_id, timeout_s)  # executed by another process
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def resolve(value: bool) -> None:
            if not fut.done():
                fut.set_result(value)

        def listener(_rec: RunRecord) -> None:
            resolve(True)

        run.listeners.append(listener)
        timer = self.clock.call_later(timeout_s, lambda: resolve(False))
        try:
            finished = await fut
        finally:
            timer.cancel()
            if listener in run.listeners:
                run.listeners.remove(listener)
        return run.record if finished else None

    async def _wait_remote(self, run_id: RunId, timeout_s: float) -> RunRecord | None:
        assert self.remote_listen is not None
        fut: asyncio.Future[RunRecord | None] = asyncio.get_running_loop().create_future()

        def resolve(value: RunRecord | None) -> None:
            if not fut.done():
                fut.set_result(value)

        cancel = self.remote_listen(run_id, resolve)
        timer = self.clock.call_later(timeout_s, lambda: resolve(None))
        try:
            return await fut
        finally:
            timer.cancel()
            cancel()

    async def finalize_interrupted(self, rec: RunRecord, fence: Fence | None = None) -> None:
        """End a run whose executing process died or lost its lease: error "interrupted by
        gateway restart", through the normal end path (fenced by `fence`): the end record,
        the lifecycle events, this process's waiters and the end hooks."""
        if rec.is_final:
            return
        run = self.active.get(RunId(rec.run_id))
        if run is None or run.task is not None or run.record.is_final:
            run = Run(rec)
        else:
            run.record = rec  # accepted here, executed elsewhere: its waiters are on this Run
        run.fence = fence
        await self._finish(run, "error", INTERRUPTED, None)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def restore(self) -> tuple[int, int]:
        """After a restart: re-queue runs that never started, end those that were running."""
        requeued = interrupted = 0
        for rec in await self.store.unfinished_runs():
            if rec.status == "queued":
                self.enqueue_restored(rec)
                requeued += 1
                continue
            now = self.clock.time()
            rec.status = "error"
            rec.error = INTERRUPTED
            rec.ended_at = now
            self.results.set(RunId(rec.run_id), rec)
            await self.store.put_run(rec)
            interrupted += 1
            for hook in self.end_hooks:
                try:
                    result = hook(rec)
                    if result is not None:
                        await result
                except Exception:
                    log.exception("run end hook failed on restore", run_id=rec.run_id)
        return requeued, interrupted

    async def drain(self, grace_s: float, *, end_timeout_s: float = 5.0) -> None:
        """Stop admitting; let running work finish within `grace_s`; leave queued runs queued.

        Runs still going after the grace end as error ("gateway shutting down") through the
        normal end path (durable, final answer, end hooks); the lane workers are given
        `end_timeout_s` for that before they are cancelled, so an end is not cut in half.
        Queued runs are not started (`draining`) and stay `queued` in the store, to be
        re-queued by `restore()` on the next start.
        """
        self.accepting = False
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for run in list(self.active.values()):
            if run.task is not None and not run.record.is_final and run.cancel_reason is None:
                run.cancel_reason = "shutdown"
                run.task.cancel()
        if self.lanes.workers:
            await asyncio.wait(list(self.lanes.workers), timeout=end_timeout_s)
        await self.lanes.cancel_all()

    def _task_error(self, exc: BaseException) -> None:
        self.task_errors += 1
        log.error("lane worker crashed", error=repr(exc))

    @property
    def queued(self) -> int:
        return self.lanes.queued + self.waiting


class _Emitter:
    """Turns agent-loop callbacks into `agent` and `chat` events for one run."""

    __slots__ = ("bus", "clock", "key", "run_id", "text")

    def __init__(self, bus: EventBus, run_id: RunId, key: SessionKey, clock: Clock) -> None:
        self.bus = bus
        self.run_id = run_id
        self.key = key
        self.clock = clock
        self.text = ""

    def assistant(self, delta: str, text: str) -> None:
        self.text = text
        self.bus.emit_agent(self.run_id, self.key, "assistant", {"delta": delta, "text": text})
        self.bus.emit_chat(
            self.run_id, self.key, "delta", deltaText=delta, message=_chat_message(text, self.clock.time())
        )

    def tool(self, phase: str, name: str, call_id: str, payload: dict[str, Any]) -> None:
        data = {"phase": phase, "name": name, "toolCallId": call_id, **payload}
        self.bus.emit_agent(self.run_id, self.key, "tool", data)

    def retrying(self, error: str) -> None:
        now_ms = int(self.clock.time() * 1000)
        self.bus.emit_agent(
            self.run_id,
            self.key,
            "lifecycle",
            {"phase": "error", "error": error, "willRetry": True, "endedAt": now_ms},
        )
        self.bus.emit_agent(self.run_id, self.key, "lifecycle", {"phase": "start", "startedAt": now_ms})


def _chat_message(text: str, now: float) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}], "timestamp": int(now * 1000)}


def _cancel_status(reason: str) -> str:
    return "error" if reason == "shutdown" else reason


def _cancel_message(reason: str) -> str:
    if reason == "timeout":
        return "run timed out"
    if reason == "shutdown":
        return "gateway shutting down"
    return "aborted"


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", error=repr(task.exception()))
