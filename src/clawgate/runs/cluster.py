"""Scale-out on Redis: several gateway processes share runs, events and results.

The glue between the run service and the two Redis I/O modules:

- `RedisDispatcher` (runs/redis_dispatch.py): accepted runs go to per-session Redis
  queues; any process executes them, one run at a time per session across all
  processes; a process that dies leaves its run to be reported as an orphan
  (finalized "interrupted by gateway restart") and its queue to be drained by others.
- `RedisFanout` (events/redis_fanout.py): every event frame a process emits is
  published, so a client connected to process A follows a run executed by process B;
  run ends ("done") and abort requests are broadcast the same way.

A run accepted on A and executed on B exists as a proxy `Run` in A's `runs_active`
(holding the accepting connection's final-response listener) until B's "done"
arrives. Waiters for runs accepted elsewhere live in `remote_run_waiters`, a
registered TTL map.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import uuid
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from clawgate.errors import StoreError
from clawgate.events.bus import EventBus
from clawgate.events.redis_fanout import RedisFanout
from clawgate.ids import RunId, SessionKey
from clawgate.runs.redis_dispatch import RedisDispatcher
from clawgate.runs.service import Run, RunService
from clawgate.settings import Settings
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap
from clawgate.store.base import Fence, Store
from clawgate.store.records import RunRecord
from clawgate.subagents.service import SubagentService

PUSH_ATTEMPTS = 4

log = structlog.get_logger("clawgate.cluster")

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(RunRecord)

Listener = Callable[[RunRecord], None]


class Cluster:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        store: Store,
        runs: RunService,
        bus: EventBus,
        subagents: SubagentService,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.runs = runs
        self.bus = bus
        self.subagents = subagents
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # A blocking pool: under a burst, callers wait for a connection instead of failing
        # with MaxConnectionsError; the bound keeps Redis' client count predictable.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.store, max_connections=256, timeout=30, socket_connect_timeout=5, socket_timeout=30
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        prefix = settings.redis_prefix
        self.dispatcher = RedisDispatcher(
            self.redis,
            prefix=f"{prefix}:dispatch",
            consumer=self.origin,
            execute=self._execute,
            on_orphan=self._orphan,
            lease_s=settings.cluster_lease_s,
            claim_idle_s=settings.cluster_claim_idle_s,
            max_sessions=settings.main_concurrency + settings.subagent_concurrency,
        )
        self.fanout = RedisFanout(
            self.redis,
            prefix=f"{prefix}:fanout",
            origin=self.origin,
            on_event=self._on_event,
            on_done=self._on_done,
            on_abort=self._on_abort,
        )
        # Per run: handle -> listener, so a cancelled wait leaves in O(1) (a list.remove per
        # cancel made cancelling many parked waits quadratic).
        self._waiter_handles = itertools.count(1)
        self.remote_waiters: TTLMap[RunId, dict[int, Listener]] = TTLMap(
            "remote_run_waiters", clock, ttl_s=settings.abort_ttl_max_s, max_size=settings.max_tracked_runs
        )
        registry.register(self.remote_waiters)
        self._reconcile_task: asyncio.Task[None] | None = None
        runs.dispatch = self._push
        runs.remote_abort = self.fanout.publish_abort
        runs.remote_listen = self.listen
        runs.end_hooks.append(self._publish_done)
        bus.remote = self._publish_event

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self.fanout.start()
        await self.fanout.wait_subscribed()
        self.dispatcher.start()
        self._reconcile_task = asyncio.create_task(self._reconcile_loop(), name="clawgate-cluster-reconcile")
        log.info("cluster member started", origin=self.origin)

    async def stop_dispatch(self) -> None:
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconcile_task
            self._reconcile_task = None
        await self.dispatcher.stop(self.settings.shutdown_grace_s)

    async def _reconcile_loop(self) -> None:
        """Pub/sub is at-most-once: a process that dies right after finishing a run may never
        publish its "done", and a subscriber that reconnects misses what was published
        meanwhile. Proxies (runs accepted here, executed elsewhere) and remote waiters
        (`agent.wait` or an `agent` retry here for a run executed elsewhere) are therefore
        checked against the store now and then, so every waiter gets the end."""
        while True:
            await asyncio.sleep(self.settings.cluster_claim_idle_s)
            try:
                await self.reconcile_once()
            except StoreError as exc:  # Redis unreachable: an outage, not a bug; next round retries
                log.warning("cluster reconcile: store unreachable", error=str(exc))
            except Exception:
                log.exception("cluster reconcile failed")

    async def reconcile_once(self) -> int:
        settled = 0
        horizon = self.clock.time() - self.settings.cluster_claim_idle_s
        for run in list(self.runs.active.values()):
            if run.task is not None or run.record.is_final or run.record.accepted_at > horizon:
                continue
            rec = await self.store.get_run(run.record.run_id)
            # An end younger than the claim idle may still have its "done" (and its events) on
            # the way: left to the next round. An older one was never told: its executor died
            # between the end write and the fan-out, so this process tells the end's events.
            if rec is not None and rec.is_final and (rec.ended_at or 0.0) <= horizon:
                self.runs.settle_remote(rec, announce=True)
                self._on_done(_enc.encode(rec))
                settled += 1
        for run_id in list(self.remote_waiters.keys()):
            rec = await self.store.get_run(run_id)
            if rec is not None and rec.is_final and run_id in self.remote_waiters:
                self._on_done(_enc.encode(rec))
                settled += 1
        return settled

    async def close(self) -> None:
        await self.fanout.stop()
        # The client was given its pool, so it does not close it unless told: without this the
        # pool's connections stay open until garbage collection.
        await self.redis.aclose(close_connection_pool=True)

    def describe(self) -> dict[str, object]:
        d = self.dispatcher
        return {
            "origin": self.origin,
            "servingSessions": d.serving,
            "freeSlots": d._free,
            "executed": d.executed,
            "orphans": d.orphans,
            "claimed": d.claimed,
            "recovered": d.recovered,
            "leasesLost": d.leases_lost,
            "endsRefused": self.runs.ends_refused,
            "eventsPublished": self.fanout.published,
            "eventsDropped": self.fanout.dropped,
        }

    # -- outbound ------------------------------------------------------------------------------
    async def _push(self, run: Run) -> None:
        # After an outage the pool still holds connections that broke during it: each fails
        # once, then reconnects. So a connection error is retried a few times before the
        # client gets UNAVAILABLE. A push that did land before its reply was lost is queued
        # twice; harmless, since a run whose record is final is never executed again (`_execute`).
        for attempt in range(PUSH_ATTEMPTS):
            try:
                await self.dispatcher.push(run.record.run_id, run.record.session_key)
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if attempt + 1 == PUSH_ATTEMPTS:
                    raise StoreError(f"cannot queue the run: redis: {exc}") from exc
                await asyncio.sleep(0.05 * (attempt + 1))
            except RedisError as exc:  # Redis answered with an error: UNAVAILABLE, retryable
                raise StoreError(f"cannot queue the run: redis: {exc}") from exc

    def _publish_event(self, session_key: SessionKey, run_id: RunId | None, frame: bytes) -> None:
        self.fanout.publish_event(run_id, session_key, frame)

    def _publish_done(self, rec: RunRecord) -> None:
        self.fanout.publish_done(_enc.encode(rec))

    # -- executing a run from the shared queue ----------------------------------------------------
    def _fence(self, session_key: str) -> Fence | None:
        lease = self.dispatcher.lease(session_key)
        return Fence(*lease) if lease is not None else None

    async def _execute(self, run_id: str, session_key: str) -> None:
        # Read first: the lease is this handler's from the moment it took the run.
        fence = self._fence(session_key)
        if fence is None:
            return  # lease lost already: the run stays in the processing list for the next holder
        rec = await self.store.get_run(run_id)
        run = self.runs.active.get(RunId(run_id))
        if rec is not None and rec.is_final:
            # Aborted while queued, or ended as an orphan by another process (this one may
            # have been paused): that end is the run's end here too.
            self.runs.settle_remote(rec)
            return
        if run is None:
            if rec is None:
                return  # its record expired: nothing to run
            if rec.kind == "subagent":
                await self.subagents.adopt(run_id)
            run = self.runs.adopt(rec)
        run.fence = fence
        await self.runs.execute(run)

    async def _orphan(self, run_id: str, session_key: str) -> None:
        fence = self._fence(session_key)
        if fence is None:
            return  # lease lost: the next holder reports it (the dispatcher keeps it in qp)
        rec = await self.store.get_run(run_id)
        if rec is None or rec.is_final:
            return
        if rec.kind == "subagent":
            await self.subagents.adopt(run_id)
        await self.runs.finalize_interrupted(rec, fence)

    # -- inbound -------------------------------------------------------------------------------------
    def _on_event(self, run_id: str | None, session_key: str, frame: bytes) -> None:
        self.bus.deliver(RunId(run_id) if run_id else None, SessionKey(session_key), frame)

    def _on_done(self, data: bytes) -> None:
        try:
            rec = _dec.decode(data)
        except msgspec.DecodeError:
            log.warning("bad done message")
            return
        run_id = RunId(rec.run_id)
        self.runs.settle_remote(rec)
        if rec.kind == "subagent":
            self.subagents.forget_remote(run_id)
        for listener in (self.remote_waiters.pop(run_id) or {}).values():
            try:
                listener(rec)
            except Exception:
                log.exception("remote final listener failed", run_id=run_id)

    def _on_abort(self, run_id: str) -> None:
        run = self.runs.active.get(RunId(run_id))
        if run is not None and run.task is not None:
            self.runs.abort(RunId(run_id))

    # -- waiting for runs executed elsewhere ------------------------------------------------------------
    def listen(self, run_id: RunId, listener: Listener) -> Callable[[], None]:
        """Call `listener` with the final record when another process finishes the run."""
        listeners = self.remote_waiters.get(run_id)
        if listeners is None:
            listeners = {}
            self.remote_waiters.set(run_id, listeners)
        self.runs.waiters.check_run(run_id, len(listeners))
        handle = next(self._waiter_handles)
        listeners[handle] = listener

        def cancel() -> None:
            current = self.remote_waiters.get(run_id)
            if current is not None and current.pop(handle, None) is not None and not current:
                self.remote_waiters.pop(run_id)

        # The run may have ended between the caller's store read and this registration.
        task = asyncio.ensure_future(self._recheck(run_id))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return cancel

    async def _recheck(self, run_id: RunId) -> None:
        rec = await self.store.get_run(run_id)
        if rec is not None and rec.is_final:
            for listener in (self.remote_waiters.pop(run_id) or {}).values():
                listener(rec)
