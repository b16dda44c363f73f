"""The run service: accept, queue, execute, time out, abort, finish, remember results.

Records and their lives (docs/design.md, record lives):
  - `runs_active`  (Run, per run):  accepted -> ended; deadline = timeout + grace, clamped,
                                   so even a run whose end is lost cannot stay forever.
  - `run_results`  (RunRecord):     ended -> run_result_ttl_s (max run_result_max entries and
                                   run_result_max_bytes), for `agent.wait` and idempotent retries.
  - `session_lanes`, `lane_workers`: exist only while a session has work.
  - run contexts and watchers live in the event bus and end with the run.
A run is durable (in the store) before it is acknowledged as accepted, and its
end is durable before the final response is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from clawgate.agent.loop import AgentInput, RetryPolicy, ToolPolicy, run_agent
from clawgate.agent.tools import DEFAULT_RUN_SCOPES, Tool
from clawgate.agents.profiles import Profile, Profiles
from clawgate.clip import clip
from clawgate.errors import NotFound, ProviderError, Unavailable
from clawgate.events.bus import END_AGENT, END_CHAT, EventBus, agent_frame, chat_frame
from clawgate.ids import ConnId, RunId, SessionKey
from clawgate.metrics import LatencyHistogram
from clawgate.providers.base import ChatMessage, Provider, Usage
from clawgate.providers.pricing import with_cost
from clawgate.runs import lifecycle
from clawgate.runs.dispatch import FinalListener, LocalDispatch, RunDispatch
from clawgate.runs.endwrite import persist_end
from clawgate.runs.lanes import Lanes
from clawgate.runs.lifecycle import INTERRUPTED, NOT_RESTORED
from clawgate.runs.slots import Slots
from clawgate.runs.waiters import RunListeners, Waiters
from clawgate.sessions.service import SessionService
from clawgate.settings import Settings
from clawgate.state.clock import Clock, Timer
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.state.ttlmap import TTLMap
from clawgate.state.weigh import record_bytes
from clawgate.store.base import Fence, SessionGate, Store
from clawgate.store.records import RunRecord

log = structlog.get_logger("clawgate.runs")

__all__ = ["INTERRUPTED", "NOT_RESTORED", "PARTIAL_MARK", "Run", "RunService", "SubmitRequest"]

PARTIAL_MARK = "\n[partial: the reply stopped before it was complete]"

EndHook = Callable[[RunRecord], Awaitable[None] | None]
StartHook = Callable[[RunRecord], None]
EndWriter = Callable[[RunRecord, Fence | None], Awaitable[RunRecord | None]]


class Run:
    """A run while it is tracked in memory (queued or running)."""

    __slots__ = ("cancel_reason", "fence", "listeners", "record", "scopes", "task", "timer", "waiting")

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        # Who gets the final record (the `agent` requests, parked `agent.wait`s): see waiters.py.
        self.listeners: RunListeners[RunRecord] = RunListeners()
        self.task: asyncio.Task[None] | None = None
        self.timer: Timer | None = None
        self.cancel_reason: str | None = None  # "aborted" | "timeout" | "shutdown"
        # Handed over by the dispatcher (`execute`) and waiting for a slot of the global (or
        # subagent) lane: still queued as far as status and admission are concerned.
        self.waiting = False
        # Set when executed from the shared Redis queue: the session lease the end write
        # depends on (a process that lost it can no longer end the run).
        self.fence: Fence | None = None
        # The scopes of whoever started the run (kept in memory only: a run restored after a
        # restart gets the default, read and write); the run's tools are limited to them.
        self.scopes: frozenset[str] = DEFAULT_RUN_SCOPES


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
    label: str | None = None
    webhook: str | None = None
    scopes: frozenset[str] | None = None


class RunService:
    """Accepts, queues, executes and ends runs.

    Ports, given at construction by the composition root (server/gateway.py):
      - `dispatch`: where accepted runs are queued (runs/dispatch.py); None: this process's
        own lanes (`LocalDispatch`). The lanes exist in every mode: `restore` and `drain` use them.
      - `gate`: the check of a new run's session that its insert makes, refusing the run
        (a session past its token budget); None: nothing to check (`Store.create_run`).
      - `end_writer`: writes a run's end and what must be durable with it (its webhook
        delivery); None: the store's fenced `end_run`.
      - `mcp_tools`: the tools of the MCP servers a profile's allowlist names.
    Hooks are registered the same way, in one place: `on_start`, `on_end`, `add_tool`.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        store: Store,
        bus: EventBus,
        sessions: SessionService,
        provider: Provider,
        *,
        dispatch: RunDispatch | None = None,
        gate: Callable[[SubmitRequest], SessionGate | None] | None = None,
        end_writer: EndWriter | None = None,
        mcp_tools: Callable[[Profile], Awaitable[Mapping[str, Tool]]] | None = None,
        tasks: Supervisor | None = None,
    ) -> None:
        self.settings = settings
        # The gateway's supervisor owns this service's background tasks (lane workers, the
        # finishing of a run cancelled while queued); a private one when built alone.
        self.tasks = tasks if tasks is not None else Supervisor(sleep=clock.sleep)
        self.clock = clock
        self.store = store
        self.bus = bus
        self.sessions = sessions
        self.provider = provider
        cap = settings.max_tracked_runs
        # New runs are refused at `cap` (`_track`), never made room for by evicting a live run.
        # Runs another process accepted and this one executes (`adopt`) are bounded by the
        # dispatcher's slots, one per global lane slot: the headroom above `cap` holds them.
        self.active: TTLMap[RunId, Run] = TTLMap(
            "runs_active",
            clock,
            ttl_s=settings.abort_ttl_max_s,
            max_size=cap + settings.main_concurrency + settings.subagent_concurrency,
            lru=False,
            on_expire=self._on_active_expired,
        )
        self.results: TTLMap[RunId, RunRecord] = TTLMap(
            "run_results",
            clock,
            ttl_s=settings.run_result_ttl_s,
            max_size=settings.run_result_max,
            # Entries alone do not bound memory: each result holds a reply of up to maxReplyBytes.
            max_bytes=settings.run_result_max_bytes,
            weigh=record_bytes,
        )
        registry.register(self.active, per_run=True)
        registry.register(self.results)
        self.waiters: Waiters[RunRecord] = Waiters(
            max_per_run=settings.max_waiters_per_run, max_per_connection=settings.max_waiters_per_connection
        )
        # Bounded by the per-connection cap (and removed on disconnect or at the run's end).
        registry.add(
            "run_waiters",
            lambda: self.waiters.total,
            ttl_s=None,
            max_size=settings.max_waiters_per_connection * settings.max_connections,
        )
        registry.add(
            "waiting_connections",
            lambda: self.waiters.connections,
            ttl_s=None,
            max_size=settings.max_connections,
        )
        # The global lanes: at most this many main (and subagent) runs execute at once; session
        # lanes wait for their slots in FIFO order (runs/slots.py).
        self.main_lane = Slots(settings.main_concurrency)
        self.subagent_lane = Slots(settings.subagent_concurrency)
        # One lane per session with queued or running work: at most one per tracked run, plus
        # one per global lane slot for lanes whose last run is still ending.
        self.lanes: Lanes[Run] = Lanes(
            clock,
            registry,
            max_lanes=cap + settings.main_concurrency + settings.subagent_concurrency,
            execute=self._execute,
            on_task_error=self._task_error,
            tasks=self.tasks,
            slots=self._slots,
        )
        # Builtin tools by name (the session tools); each agent gets those its profile allows.
        self.tools: dict[str, Tool] = {}
        # The builtin tools each profile allows, by profile id: computed on a profile's first
        # run (the allowlist's patterns against every tool), dropped when a tool is added.
        self._allowed_tools: dict[str, dict[str, Tool]] = {}
        self.profiles = Profiles(settings)
        # Providers of agent profiles whose `provider` is not the gateway's (set by the gateway).
        self.providers: dict[str, Provider] = {}
        self.mcp_tools = mcp_tools
        self.start_hooks: list[StartHook] = []
        self.end_hooks: list[EndHook] = []
        self.accepting = True
        self.draining = False
        self.running = 0
        # Set while no run executes here: `drain` waits on it instead of polling `running`.
        self.idle = asyncio.Event()
        self.idle.set()
        # Runs handed over by another process's dispatcher (`execute`), waiting for a global
        # slot; a run queued here waits in its session lane, counted by `lanes.queued`.
        self.waiting = 0
        self.totals: dict[str, int] = {"ok": 0, "error": 0, "timeout": 0, "aborted": 0}
        self.latency = LatencyHistogram()
        self.task_errors = 0
        # Turn retries by failure kind: keyed by ProviderError.kind, a fixed set (like `totals`).
        self.provider_retries: Counter[str] = Counter()
        # Ends this process tried to write and the store refused: the run already had an end,
        # or this process had lost the run's lease (scaleout/member.py). Logged, never raised.
        self.ends_refused = 0
        self.dispatch: RunDispatch = dispatch if dispatch is not None else LocalDispatch(self.lanes, store)
        self.end_writer = end_writer
        self.gate = gate

    # -- wiring (called by the composition root) --------------------------------------------
    def on_start(self, hook: StartHook) -> None:
        """Call `hook` with the record of every run this process starts executing."""
        self.start_hooks.append(hook)

    def on_end(self, hook: EndHook) -> None:
        """Call `hook` once with the final record of every run this process ends (awaited
        when it returns an awaitable; a raise is logged)."""
        self.end_hooks.append(hook)

    def add_tool(self, tool: Tool) -> None:
        """A builtin tool, given to each agent whose profile allows its name."""
        self.tools[tool.spec.name] = tool
        self._allowed_tools.clear()

    # -- accept ---------------------------------------------------------------------------
    async def submit(self, req: SubmitRequest) -> tuple[Run | None, RunRecord, bool]:
        """Accept a run. Returns (live run or None, record, created)."""
        if not self.accepting:
            raise Unavailable("gateway is shutting down", retry_after_ms=2000)
        self.profiles.require(req.agent_id, "agentId")
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
            label=req.label,
            webhook=req.webhook or self.settings.webhook_url,
        )
        self.dispatch.check_room(req.session_key)
        run = Run(record)
        if req.scopes is not None:
            run.scopes = req.scopes
        # Track before the durable insert so a concurrent retry of the same key joins this run.
        self._track(req.run_id, run)
        try:
            # After tracking, with no await between the admission checks and `_track`.
            prior = await self.dispatch.insert(
                record,
                reuse_after_s=self.settings.dedupe_ttl_s,
                now=now,
                gate=self.gate(req) if self.gate is not None else None,
            )
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
        try:
            await self.dispatch.push(run)
        except BaseException:
            # Not queued anywhere (the lanes filled up during the insert, Redis refused): end it
            # now rather than leave an accepted run without an end.
            await self._finish(run, "error", "could not queue the run", None)
            raise
        return run, record, True

    def adopt(self, record: RunRecord) -> Run:
        """Track a run accepted by another process, which this process is about to execute."""
        run = Run(record)
        self._track(record.run_id, run, limit=self.active.max_size)
        return run

    def _track(self, run_id: RunId, run: Run, *, limit: int | None = None) -> None:
        """Put a run in `runs_active`, or refuse (UNAVAILABLE) when it holds `limit` runs.

        The map would otherwise evict its oldest entry: a live run that keeps executing
        while no abort, wait or retry can find it any more.
        """
        cap = self.settings.max_tracked_runs if limit is None else limit
        if run_id not in self.active and len(self.active) >= cap:
            raise Unavailable(
                f"gateway overloaded: tracking {len(self.active)} runs (maxTrackedRuns {cap})",
                retry_after_ms=1000,
                details={"maxTrackedRuns": cap},
            )
        self.active.set(run_id, run)

    async def execute(self, run: Run) -> None:
        """Execute one run now (the shared queue already serialized its session): wait for a
        global slot, in the same FIFO as this process's session lanes."""
        if not self._startable(run):
            return
        slots = self._slots(run)
        run.waiting = True
        self.waiting += 1
        try:
            await slots.acquire()
        finally:
            self._stop_waiting(run)
        try:
            await self._execute(run)
        finally:
            slots.release()

    def settle_remote(self, rec: RunRecord) -> None:
        """Another process ended a run this one accepted: answer the local waiters."""
        run_id = rec.run_id
        run = self.active.get(run_id)
        if run is None or run.task is not None or run.record.is_final:
            return
        run.record = rec
        self.active.pop(run_id)
        self.bus.clear_run(run_id)  # left by an end refused here (`_end_refused`), if any
        self.results.set(run_id, rec)
        self._settle(run)

    def follow(
        self, run: Run | None, rec: RunRecord, listener: FinalListener, owner: ConnId | None
    ) -> RunRecord | None:
        """Arrange for `listener` to get the run's final record, wherever the run executes.

        Returns the final record instead when the run has already ended (the caller answers
        at once, after its own accepted response): also when, on Redis, the run ended in
        another process and was settled here while `submit` still awaited the push. Raises
        FORBIDDEN / UNAVAILABLE when a waiter cap is reached, before anything is registered.
        The listener is owned by `owner`: it goes when that connection closes.
        """
        run = run if run is not None else self.active.get(rec.run_id)
        if run is not None:
            if run.listeners.closed:  # ended (and settled) while the caller was awaiting
                return run.record
            self.waiters.add(rec.run_id, run.listeners, listener, owner)
            return None
        if rec.is_final:
            return rec
        if self.dispatch.executes_elsewhere(None):
            handle = self.waiters.reserve(owner)

            def on_final(final: RunRecord) -> None:
                self.waiters.release(owner, handle)
                listener(final)

            try:
                self.waiters.check_run(rec.run_id, self.dispatch.listening(rec.run_id))
                cancel = self.dispatch.listen(rec.run_id, on_final)
            except BaseException:
                self.waiters.release(owner, handle)
                raise
            self.waiters.bind(owner, handle, cancel)
        return None

    def drop_waiters(self, conn_id: ConnId) -> int:
        """A connection closed: nobody is left to answer, so its listeners go now."""
        return self.waiters.drop_connection(conn_id)

    def enqueue_restored(self, record: RunRecord) -> None:
        """Re-queue a run that was accepted but never started before a restart."""
        key = record.session_key
        if not self.lanes.has_room(key):
            raise Unavailable("no session lane free", details={"maxLanes": self.lanes.max_lanes})
        run = Run(record)
        self._track(record.run_id, run)
        self.lanes.push(key, run)

    # -- execute -------------------------------------------------------------------------------
    def _startable(self, run: Run) -> bool:
        # An abort or timeout of a queued run finishes it in another task; `cancel_reason` is
        # set at once, so a run is never started between that request and its end.
        return lifecycle.can_start(run.record, run.cancel_reason, self.draining)

    def _stop_waiting(self, run: Run) -> None:
        if run.waiting:
            run.waiting = False
            self.waiting -= 1

    def _slots(self, run: Run) -> Slots:
        return self.subagent_lane if run.record.kind == "subagent" else self.main_lane

    async def _execute(self, run: Run) -> None:
        """Run `run` to its end; the caller holds a slot of `_slots(run)`."""
        if not self._startable(run):  # aborted while queued, or shutting down
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
            reason = run.cancel_reason
            await self._finish(run, lifecycle.cancel_status(reason), lifecycle.cancel_message(reason), None)
        finally:
            run.task = None
            if run.timer is not None:
                run.timer.cancel()

    async def _run(self, run: Run) -> None:
        rec = run.record
        run_id, key = rec.run_id, rec.session_key
        now = self.clock.time()
        rec.status = "running"
        rec.started_at = now
        self.running += 1
        self.idle.clear()
        try:
            backstop_s = self.settings.abort_ttl_s(rec.timeout_s)
            self.active.touch(run_id, backstop_s)
            self.bus.extend_watch(run_id, backstop_s)
            run.timer = self.clock.call_later(rec.timeout_s, lambda: self._timeout(run))
            self.store.put_run(rec)
            # Held as long as the run may live: a provider silent past the idle TTL must not
            # lose the context (its seq would restart at 1); the run's end clears it.
            self.bus.register_run(run_id, key, hold_s=backstop_s)
            for hook in self.start_hooks:
                hook(rec)
            self.bus.emit_agent(run_id, key, "lifecycle", {"phase": "start", "startedAt": int(now * 1000)})
            history = await self._history(key, known_new=rec.kind == "subagent")
            self.sessions.append(key, "user", rec.message, rec.run_id)
            emitter = _Emitter(self.bus, run_id, key, self.clock)
            try:
                profile = self.profiles.require(rec.agent_id, "agentId")
                text = await run_agent(
                    self.providers.get(profile.provider, self.provider),
                    AgentInput(
                        run_id=rec.run_id,
                        session_key=key,
                        agent_id=rec.agent_id,
                        message=rec.message,
                        history=history,
                        model=rec.model or profile.model,
                        system_prompt=_system_prompt(profile, rec.extra_system_prompt),
                        fallback_models=list(profile.fallback_models) if profile.fallback_models else None,
                        scopes=run.scopes,
                    ),
                    emitter,
                    await self.tools_for(profile),
                    policy=ToolPolicy(
                        max_turns=profile.max_turns,
                        max_tool_calls=profile.max_tool_calls,
                        timeout_s=profile.tool_timeout_s,
                        result_max_bytes=profile.tool_result_max_bytes,
                        sleep=self.clock.sleep,
                    ),
                    max_retries=self.settings.provider_max_retries,
                    retry=RetryPolicy(
                        self.settings.provider_max_retries,
                        self.settings.provider_retry_base_s,
                        self.settings.provider_retry_max_delay_s,
                        self.clock.sleep,
                        self.provider_retries,
                    ),
                    max_reply_bytes=self.settings.max_reply_bytes,
                )
            except ProviderError as exc:
                rec.usage = self._usage(rec, emitter)
                if emitter.text:
                    # Keep what was streamed, marked so the next turn (and a reader) knows it is cut.
                    self.sessions.append(key, "assistant", emitter.text + PARTIAL_MARK, rec.run_id)
                await self._finish(run, "error", exc.message, emitter.text or None)
                return
            except Exception as exc:
                # Anything else (a store error reading history, a tool that crashed) ends this
                # run as error; letting it escape would kill the lane worker and strand every
                # run queued behind it in the session.
                log.exception("run failed", run_id=rec.run_id)
                await self._finish(run, "error", f"{type(exc).__name__}: {exc}", emitter.text or None)
                return
            rec.usage = self._usage(rec, emitter)
            await self._finish(run, "ok", None, text)
        finally:
            self.running -= 1
            if not self.running:
                self.idle.set()

    def _usage(self, rec: RunRecord, emitter: _Emitter) -> dict[str, Any] | None:
        profile = self.profiles.get(rec.agent_id)
        model = (
            rec.model
            or (profile.model if profile is not None else None)
            or getattr(self.provider, "default_model", None)
            or self.provider.name
        )
        return with_cost(emitter.totals(), model, self.settings.model_prices)

    async def tools_for(self, profile: Profile) -> Mapping[str, Tool]:
        """The tools the agent's allowlist names: denied unless allowed."""
        builtin = self._allowed_tools.get(profile.id)
        if builtin is None:
            builtin = {name: tool for name, tool in self.tools.items() if profile.allows(name)}
            self._allowed_tools[profile.id] = builtin
        if self.mcp_tools is None or not profile.mcp_servers():
            return builtin
        return {**builtin, **(await self.mcp_tools(profile))}

    async def _history(self, key: SessionKey, *, known_new: bool) -> list[ChatMessage]:
        """Mark the run's session used and read the history the agent is given."""
        messages = await self.sessions.open_for_run(
            key, self.settings.transcript_history_max, known_new=known_new
        )
        return [
            ChatMessage(role=m.role if m.role in ("user", "assistant") else "user", content=m.content)
            for m in messages
        ]

    # -- end ------------------------------------------------------------------------------------
    async def _finish(self, run: Run, status: str, error: str | None, text: str | None) -> None:
        """End a run tracked by this process (executed, queued or accepted here)."""
        await self._complete(run, status, error, text)

    async def _complete(
        self, run: Run, status: str, error: str | None, text: str | None, *, restored: bool = False
    ) -> None:
        """The one path by which a run ends here: `_finish`, `finalize_interrupted` and
        `restore` all come through it.

        The end transition (runs/lifecycle.py), then the end write, fenced by `run.fence`; if
        the store kept this end: the lifecycle events, the bus context cleared, the result
        remembered, the end hooks called once, the waiters answered. If the store holds
        another end (or this process lost the lease), that end, with no events and no hooks.

        `restored`: the end of a run left open by a process that is gone, written by
        `restore` before this one serves anyone. It differs on purpose:
          - no duration is measured: the time the gateway was down is no part of the run;
          - the write is tried once and a failure raises (the start fails, the run keeps its
            open record and the next start ends it), rather than ending it in memory only;
          - no lifecycle events and no totals or latency: nobody can follow a run of a
            previous process (its contexts and watchers died with it), and the totals count
            the runs this process executed (`restore` returns how many it ended).
        """
        rec = run.record
        if rec.is_final:
            return
        before = msgspec.structs.replace(rec)
        key = rec.session_key
        now = self.clock.time()
        ended = lifecycle.end(rec, status, error, text, now, measure=not restored)
        # Final at once (before the first await), so no second end starts in this process;
        # in place: the accepting request and the results map hold this same record.
        for name in lifecycle.END_FIELDS:
            setattr(rec, name, getattr(ended, name))
        if run.timer is not None:
            run.timer.cancel()
        # The reply goes into the transcript in the same (or an earlier) transaction as the
        # end: the store's writer is FIFO, so a crash after the final answer never loses it.
        # A fenced end (a run from the shared Redis queue) may be refused: the store writes its
        # reply in the end's own script (RedisStore.end_run), so it lands only with that end.
        if (reply := lifecycle.reply_before_end(run.fence is not None, rec)) is not None:
            self.sessions.append(key, "assistant", reply.content, rec.run_id)
        elif text:
            self.sessions.mark_written(key)  # the end's own write may append the reply
        if not restored:
            # Written with the end: whoever settles the run from the store can tell its end
            # events with these seqs if this process dies before they go out.
            rec.end_seqs = self.bus.next_seqs(rec.run_id)
        stored, cancelled = await self._write_end(run, must_persist=restored)
        if stored is not rec:
            self._end_refused(run, before, stored)
        else:
            if run.fence is not None and not restored and (reply := rec.reply_message()) is not None:
                self.sessions.message_appended(reply)  # before the end events, as `append`'s
            await self._ended(run, key, now, announce=not restored)
        if cancelled:
            raise asyncio.CancelledError

    async def _write_end(self, run: Run, *, must_persist: bool = False) -> tuple[RunRecord | None, bool]:
        """Write the end (fenced when the run came from the shared queue). A cancellation
        meanwhile (a lost lease, shutdown) does not cut the end in half: the write is awaited
        to its outcome and the end completed; (stored end, cancelled) tells the caller.
        `must_persist`: one attempt, and a failed write raises."""
        rec = run.record
        # Retried through a store outage (runs/endwrite.py): the end is written when it is back.
        retry_s = (
            self.settings.store_end_retry_s if self.store.retries_end_writes and not must_persist else 0.0
        )
        write = asyncio.ensure_future(
            persist_end(self.store, rec, run.fence, retry_for_s=retry_s, writer=self.end_writer)
        )
        cancelled = False
        while True:
            try:
                return await asyncio.shield(write), cancelled
            except asyncio.CancelledError:
                if write.cancelled():
                    raise
                cancelled = True
            except Exception:
                if must_persist:
                    raise
                # The run still ends here (waiters, events, hooks): better than no end at all.
                log.exception("could not persist run end", run_id=rec.run_id)
                return rec, cancelled

    async def _ended(self, run: Run, key: SessionKey, now: float, *, announce: bool) -> None:
        """The end is durable and it is this one: tell everyone (`announce`: the events and
        totals too, see `_complete`)."""
        rec = run.record
        run_id = rec.run_id
        if announce:
            self._emit_end(rec, run_id, key, now)
        self.bus.clear_run(run_id)
        if announce:
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
        if stored is not None:
            self.bus.clear_run(run_id)
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
        # The run's event context stays until then: if this process becomes that holder
        # again, the end it tells continues the run's seqs (`settle_remote` clears it).
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
        for listener in self.waiters.settle(run.listeners):
            try:
                listener(run.record)
            except Exception:
                log.exception("final listener failed", run_id=run.record.run_id)
        self.bus.unwatch_run(run.record.run_id)

    def _emit_end(self, rec: RunRecord, run_id: RunId, key: SessionKey, now: float) -> None:
        events = lifecycle.end_events(rec, now)
        agent_seq, chat_seq = rec.end_seqs or (None, None)
        self.bus.emit_agent(run_id, key, "lifecycle", events.lifecycle, seq=agent_seq, end=END_AGENT)
        chat = _end_chat(rec, events, now)
        self.bus.emit_chat(run_id, key, events.chat_state, seq=chat_seq, end=END_CHAT, **chat)

    def tell_end(self, rec: RunRecord, told: int) -> bool:
        """The end events of a run another process executed and ended, with the seqs it wrote
        into the record, when that process may have died before sending them (`told`: the
        END_* bits this process already delivered). Delivered here and relayed to the other
        processes, which drop what they were told already; no listener is called (foreign
        events never reach them). False when the record holds no seqs to tell them with."""
        if rec.end_seqs is None or len(rec.end_seqs) != 2 or rec.ended_at is None:
            return False  # ended by a version that did not write them, or never ended with events
        run_id, key, now = rec.run_id, rec.session_key, rec.ended_at
        events = lifecycle.end_events(rec, now)
        if not told & END_AGENT:
            frame = agent_frame(run_id, key, rec.end_seqs[0], "lifecycle", int(now * 1000), events.lifecycle)
            self.bus.publish(run_id, key, frame, end=END_AGENT)
        if not told & END_CHAT:
            frame = chat_frame(run_id, key, rec.end_seqs[1], events.chat_state, _end_chat(rec, events, now))
            self.bus.publish(run_id, key, frame, end=END_CHAT)
        return True

    # -- abort / timeout ------------------------------------------------------------------------
    def _cancel(self, run: Run, reason: str) -> bool:
        if run.record.is_final or run.cancel_reason is not None:
            return False
        run.cancel_reason = reason
        if run.task is not None:
            run.task.cancel()
            return True
        # Still queued: drop it from its lane (or stop counting it as waiting for a global
        # slot; `execute` returns when it gets one) and finish it right away.
        self.lanes.remove(run.record.session_key, run)
        self._stop_waiting(run)
        self.tasks.spawn(
            self._finish(run, lifecycle.cancel_status(reason), lifecycle.cancel_message(reason), None),
            name="run-cancel-finish",
        )
        return True

    def _timeout(self, run: Run) -> None:
        self._cancel(run, "timeout")

    def abort(self, run_id: RunId) -> bool:
        run = self.active.get(run_id)
        if run is None:
            if self.results.get(run_id) is None:
                raise NotFound(f"unknown run {clip(run_id)}", details={"runId": run_id})
            return False
        if self.dispatch.executes_elsewhere(run):
            # It may be executing in another process: ask every process; the executor cancels it.
            # Ending it here too means a run still waiting in the shared queue is skipped.
            self.dispatch.abort(run_id)
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

    async def wait(self, run_id: RunId, timeout_s: float, owner: ConnId | None = None) -> RunRecord | None:
        """The final record, or None if the run is still going when the wait times out.

        A parked wait counts against the waiter caps of the run and of `owner`; it is removed
        in O(1) when it ends, times out or is cancelled (its connection closed).
        """
        run, rec = await self.lookup(run_id)
        if run is None:
            if rec is None:
                raise NotFound(f"unknown or expired run {clip(run_id)}", details={"runId": run_id})
            if rec.is_final or timeout_s <= 0 or not self.dispatch.executes_elsewhere(None):
                return rec if rec.is_final else None
            return await self._wait_remote(run_id, timeout_s, owner)
        if timeout_s <= 0:
            return None
        if self.dispatch.executes_elsewhere(run):
            return await self._wait_remote(run_id, timeout_s, owner)  # executed by another process
        if run.listeners.closed:
            return run.record
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def resolve(value: bool) -> None:
            if not fut.done():
                fut.set_result(value)

        def listener(_rec: RunRecord) -> None:
            resolve(True)

        handle = self.waiters.add(run_id, run.listeners, listener, owner)
        timer = self.clock.call_later(timeout_s, lambda: resolve(False))
        try:
            finished = await fut
        finally:
            timer.cancel()
            self.waiters.remove(run.listeners, handle)
        return run.record if finished else None

    async def _wait_remote(self, run_id: RunId, timeout_s: float, owner: ConnId | None) -> RunRecord | None:
        handle = self.waiters.reserve(owner)
        try:
            fut: asyncio.Future[RunRecord | None] = asyncio.get_running_loop().create_future()

            def resolve(value: RunRecord | None) -> None:
                if not fut.done():
                    fut.set_result(value)

            self.waiters.check_run(run_id, self.dispatch.listening(run_id))
            cancel = self.dispatch.listen(run_id, resolve)
            timer = self.clock.call_later(timeout_s, lambda: resolve(None))
            try:
                return await fut
            finally:
                timer.cancel()
                cancel()
        finally:
            self.waiters.release(owner, handle)

    async def finalize_interrupted(self, rec: RunRecord, fence: Fence | None = None) -> None:
        """End a run whose executing process died or lost its lease: error "interrupted by
        gateway restart", through the normal end path (fenced by `fence`): the end record,
        the lifecycle events, this process's waiters and the end hooks."""
        if rec.is_final:
            return
        run = self.active.get(rec.run_id)
        if run is None or run.task is not None or run.record.is_final:
            run = Run(rec)
        else:
            run.record = rec  # accepted here, executed elsewhere: its waiters are on this Run
        run.fence = fence
        await self._complete(run, "error", INTERRUPTED, None)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def restore(self) -> tuple[int, int]:
        """After a restart: re-queue runs that never started, end those that were running."""
        requeued = interrupted = 0
        for rec in await self.store.unfinished_runs():
            error = INTERRUPTED
            if rec.status == "queued":
                try:
                    self.enqueue_restored(rec)
                except Unavailable:
                    # More queued runs than this gateway may track: end the rest visibly rather
                    # than leave them queued with no end (or evict runs already re-queued).
                    log.warning("queued run not restored: maxTrackedRuns reached", run_id=rec.run_id)
                    error = NOT_RESTORED
                else:
                    requeued += 1
                    continue
            await self._complete(Run(rec), "error", error, None, restored=True)
            interrupted += 1
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
        if self.running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), grace_s)
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

    __slots__ = ("bus", "clock", "key", "run_id", "text", "tokens_in", "tokens_out")

    def __init__(self, bus: EventBus, run_id: RunId, key: SessionKey, clock: Clock) -> None:
        self.bus = bus
        self.run_id = run_id
        self.key = key
        self.clock = clock
        self.text = ""
        self.tokens_in = 0
        self.tokens_out = 0

    def usage(self, usage: Usage) -> None:
        self.tokens_in += usage.input
        self.tokens_out += usage.output

    def totals(self) -> dict[str, int] | None:
        if not (self.tokens_in or self.tokens_out):
            return None
        return {"input": self.tokens_in, "output": self.tokens_out, "total": self.tokens_in + self.tokens_out}

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


def _system_prompt(profile: Profile, extra: str | None) -> str | None:
    parts = [p for p in (profile.system_prompt, extra) if p]
    return "\n\n".join(parts) if parts else None


def _end_chat(rec: RunRecord, events: lifecycle.EndEvents, now: float) -> dict[str, Any]:
    """The fields of a run's end `chat` event besides its state."""
    if events.chat_state == "final":
        return {"message": _chat_message(rec.result_text or "", now)}
    return events.chat


def _chat_message(text: str, now: float) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}], "timestamp": int(now * 1000)}
