"""Scale-out on Redis: several gateway processes share runs, events and results.

`ClusterMember` is the glue between the core (run service, event bus, subagents) and the two Redis I/O modules:

- `RedisDispatcher` (scaleout/dispatch.py): accepted runs go to per-session Redis
  queues; any process executes them, one run at a time per session across all
  processes; a process that dies leaves its run to be reported as an orphan
  (finalized "interrupted by gateway restart") and its queue to be drained by others.
- `RedisEventRelay` (scaleout/fanout.py): every event frame a process emits is
  published, so a client connected to process A follows a run executed by process B;
  run ends ("done") and abort requests are broadcast the same way.

A run accepted on A and executed on B exists as a proxy `Run` in A's `runs_active`
(holding the accepting connection's final-response listener) until B's "done"
arrives. Waiters for runs accepted elsewhere live in `remote_run_waiters`, a
registered TTL map.

Ports. The core sees none of this: the run service queues through `RedisRunDispatch`
(scaleout/dispatch.py; its `RunDispatch`, runs/dispatch.py) and the event bus relays
frames through `RedisEventRelay` (its `EventRelay`), both given to them at construction.

Construction order. Both directions need the other side: the bus and the run service take
their relay and dispatch when they are built, and the member's inbound side needs them (a
run taken from the shared queue executes through the run service; a frame from another
process is delivered by the bus; a subagent run is adopted by the subagent service). So the
member is built first, holding no reference to the core, and the composition root binds
the core to it with `bind(runs, subagents, bus)`: the executor port. Nothing arrives
before `start()`, which refuses to run unbound, so no message can find it half-wired.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import msgspec
import redis.asyncio as aioredis
import structlog

from clawgate.errors import StoreError
from clawgate.events.bus import END_BOTH, EventBus, frame_seq
from clawgate.ids import RunId, SessionKey
from clawgate.runs.service import RunService
from clawgate.scaleout.dispatch import RedisDispatcher, RedisRunDispatch
from clawgate.scaleout.fanout import RedisEventRelay
from clawgate.settings import Settings
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.state.ttlmap import TTLMap
from clawgate.store.base import Fence, Store
from clawgate.store.records import RunRecord
from clawgate.store.redis_keys import DISPATCH, FANOUT, namespace
from clawgate.store.redis_store import RedisStore
from clawgate.subagents.service import SubagentService

log = structlog.get_logger("clawgate.cluster")

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(RunRecord)

# How long this process remembers which end events of a run it delivered (`ends_told`): a copy
# arriving later (an executor that was paused, not dead) would be delivered a second time.
ENDS_TOLD_TTL_S = 600.0


class ClusterMember:
    """This process as a member of the cluster: the Redis client, the shared queues and the
    fan-out, the core's ports over them (`dispatch`, `relay`), and what arrives from other
    processes (runs to execute or to report as orphans, frames, ends, aborts)."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        store: Store,
        *,
        tasks: Supervisor | None = None,
    ) -> None:
        self.settings = settings
        # The gateway's task supervisor; a private one for a member built alone.
        self.tasks = tasks or Supervisor()
        self.clock = clock
        self.store = store
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # A blocking pool: under a burst, callers wait for a connection instead of failing
        # with MaxConnectionsError; the bound keeps Redis' client count predictable.
        # No socket timeout: every call goes through `redis_call`, which bounds it as a whole.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.store, max_connections=256, timeout=30, socket_connect_timeout=5, socket_timeout=None
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        prefix = settings.redis_prefix
        self.dispatcher = RedisDispatcher(
            self.redis,
            prefix=namespace(prefix, DISPATCH),
            consumer=self.origin,
            execute=self._execute,
            on_orphan=self._orphan,
            lease_s=settings.cluster_lease_s,
            claim_idle_s=settings.cluster_claim_idle_s,
            max_sessions=settings.main_concurrency + settings.subagent_concurrency,
            tasks=self.tasks,
        )
        self.fanout = RedisEventRelay(
            self.redis,
            prefix=namespace(prefix, FANOUT),
            origin=self.origin,
            on_event=self._on_event,
            on_done=self._on_done,
            on_abort=self._on_abort,
            tasks=self.tasks,
        )
        # The core's ports: the run service's dispatch, the event bus' relay.
        if not isinstance(store, RedisStore):
            raise TypeError("a cluster member needs the Redis store: its queues live there")
        self.dispatch = RedisRunDispatch(
            self.dispatcher,
            self.fanout,
            store,
            clock,
            registry,
            ttl_s=settings.abort_ttl_max_s,
            max_runs=settings.max_tracked_runs,
            tasks=self.tasks,
        )
        self.relay = self.fanout
        self.remote_waiters = self.dispatch.waiters
        # Per run, the END_* bits of the end events delivered to this process's connections:
        # the executor's own, another process's, or told here from the store by the reconcile
        # (an executor that died between its end write and its events). Each is delivered once.
        self.ends_told: TTLMap[RunId, int] = TTLMap(
            "run_ends_told", clock, ttl_s=ENDS_TOLD_TTL_S, max_size=settings.max_tracked_runs
        )
        registry.register(self.ends_told)
        self.ends_deduped = 0  # end event frames dropped as told already
        # Per run another process executes: the highest `agent` and `chat` seq delivered here.
        # If this process ends that run in its executor's place (an orphan taken over), its end
        # events continue from there. Gone with the run's done or end events; the TTL (the
        # longest a run may live) is the backstop for a run whose end never reached us.
        self.seqs_seen: TTLMap[RunId, list[int]] = TTLMap(
            "run_seqs_seen",
            clock,
            ttl_s=settings.abort_ttl_max_s,
            max_size=settings.max_tracked_runs,
            lru=False,
        )
        registry.register(self.seqs_seen)
        self._runs: RunService | None = None
        self._subagents: SubagentService | None = None
        self._bus: EventBus | None = None

    def bind(self, runs: RunService, subagents: SubagentService, bus: EventBus) -> None:
        """The executor port: runs taken from the shared queue execute through `runs`, frames
        from other processes are delivered by `bus` (module doc, construction order)."""
        self._runs, self._subagents, self._bus = runs, subagents, bus

    @property
    def runs(self) -> RunService:
        assert self._runs is not None, "ClusterMember.bind() was not called"
        return self._runs

    @property
    def subagents(self) -> SubagentService:
        assert self._subagents is not None, "ClusterMember.bind() was not called"
        return self._subagents

    @property
    def bus(self) -> EventBus:
        assert self._bus is not None, "ClusterMember.bind() was not called"
        return self._bus

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._runs is None:
            raise RuntimeError("ClusterMember.bind() must be called before start()")
        self.fanout.start()
        await self.fanout.wait_subscribed()
        self.dispatcher.start()
        self.tasks.loop("cluster-reconcile", self._reconcile_loop, retry_s=self.settings.cluster_claim_idle_s)
        log.info("cluster member started", origin=self.origin)

    async def stop_dispatch(self) -> None:
        await self.tasks.stop_loop("cluster-reconcile")
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
            except Exception as exc:  # a bug: counted; the next round runs all the same
                log.exception("cluster reconcile failed")
                self.tasks.record_failure("cluster-reconcile", exc)

    async def reconcile_once(self) -> int:
        settled = 0
        horizon = self.clock.time() - self.settings.cluster_claim_idle_s
        for run in list(self.runs.active.values()):
            if run.task is not None or run.record.is_final or run.record.accepted_at > horizon:
                continue
            rec = await self.store.get_run(run.record.run_id)
            if rec is not None and rec.is_final:
                self._settle_from_store(rec)
                settled += 1
        for run_id in list(self.remote_waiters.keys()):
            rec = await self.store.get_run(run_id)
            if rec is not None and rec.is_final and run_id in self.remote_waiters:
                self._settle_from_store(rec)
                settled += 1
        return settled

    def _settle_from_store(self, rec: RunRecord) -> None:
        """A run ended elsewhere and no "done" came: the executor may have died between its
        end write and its messages. Its end events are told from the record (the seqs it
        wrote), here and to the other processes; every process drops what it was told
        already, so an executor that was only late sends no second end."""
        told = self.ends_told.get(rec.run_id) or 0
        if told != END_BOTH and self.runs.tell_end(rec, told):
            self.ends_told.set(rec.run_id, END_BOTH)
        self._on_done(_enc.encode(rec))

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
            "eventsSkipped": self.fanout.skipped,
            "endsDeduped": self.ends_deduped,
        }

    # -- outbound ------------------------------------------------------------------------------
    def publish_done(self, rec: RunRecord) -> None:
        """A run end hook: every process (this one too) learns the run's end. Called right
        after the run's end events went to the local bus: they count as told here."""
        if rec.end_seqs is not None:
            self.ends_told.set(rec.run_id, END_BOTH)
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
        seen = self.seqs_seen.pop(RunId(run_id))
        if seen is not None:
            self.bus.continue_seqs(RunId(run_id), SessionKey(session_key), seen[0], seen[1])
        await self.runs.finalize_interrupted(rec, fence)

    # -- inbound -------------------------------------------------------------------------------------
    def _on_event(self, run_id: str | None, session_key: str, frame: bytes, end: int) -> None:
        if end and run_id:
            told = self.ends_told.get(RunId(run_id)) or 0
            if told & end:
                self.ends_deduped += 1
                return
            self.ends_told.set(RunId(run_id), told | end)
            if told | end == END_BOTH:
                self.seqs_seen.pop(RunId(run_id))
        elif run_id:
            self._note_seq(RunId(run_id), frame)
        self.bus.deliver(RunId(run_id) if run_id else None, SessionKey(session_key), frame)

    def _note_seq(self, run_id: RunId, frame: bytes) -> None:
        event, seq = frame_seq(frame)
        if not seq or event not in ("agent", "chat"):
            return
        seen = self.seqs_seen.get(run_id)
        if seen is None:
            seen = [0, 0]
            self.seqs_seen.set(run_id, seen)
        i = 0 if event == "agent" else 1
        if seq > seen[i]:
            seen[i] = seq

    def _on_done(self, data: bytes) -> None:
        try:
            rec = _dec.decode(data)
        except msgspec.DecodeError:
            log.warning("bad done message")
            return
        run_id = RunId(rec.run_id)
        self.seqs_seen.pop(run_id)
        self.runs.settle_remote(rec)
        if rec.kind == "subagent":
            self.subagents.forget_remote(run_id)
        self.dispatch.settle(rec)

    def _on_abort(self, run_id: str) -> None:
        run = self.runs.active.get(RunId(run_id))
        if run is not None and run.task is not None:
            self.runs.abort(RunId(run_id))
