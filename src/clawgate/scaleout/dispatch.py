"""Per-session FIFO run queues shared by several gateway processes, on Redis.

Any process may execute any run, one run at a time per session across all processes,
in push order, and nothing is lost when a process dies (docs/design.md, persistence and scale-out).

Two classes: `RedisDispatcher`, the queues themselves (below), and `RedisRunDispatch`, the
run service's `RunDispatch` port (runs/dispatch.py) over them, at the end of this module.

Interface of the queues (`ClusterMember` in scaleout/member.py wires them)::

    d = RedisDispatcher(redis, prefix="clawgate:dispatch", consumer=process_id,
                        execute=run_to_end, on_orphan=finalize_interrupted)
    d.start()
    await d.push(run_id, session_key)     # from any process
    await d.stop()                        # graceful; d.kill() simulates a crash (tests)

``consumer`` names this process in the consumer group; it must be unique among live
processes (e.g. host, pid and a random suffix). The client's ``socket_timeout`` (if
any) and ``redis_io.CALL_TIMEOUT_S`` must exceed READ_BLOCK_MS.

``execute(run_id, session_key)`` runs one run to its end and should not raise (a raise
is logged and counted, the run counts as done). ``on_orphan(run_id, session_key)`` is
called for a run whose executing process died (or lost its lease, or was stopped after
its grace period): the gateway finalizes it as error "interrupted by gateway restart".
It may be called more than once for one run, and for a run whose execution did end if
the executing process lost Redis right after, so it must be idempotent ("finalize
unless already final"). If it raises, the run stays in the processing list and the
session is handed off, so a holder reports it again. Both callbacks should end runs
with a write fenced by ``lease(session_key)`` (see Fencing below), read when they start.

Key layout (``P`` is the prefix; every name is built by ``DispatchKeys``, store/redis_keys.py)::

    P:q:{session}     LIST    pending run ids, FIFO; expires queue_ttl_s (1 day), refreshed on
                              push and, while a holder drains it, on every step and renewal
    P:qp:{session}    LIST    the run being executed (at most one, plus orphans whose
                              report failed); same expiry, refreshed on every step and renewal
    P:lock:{session}  STRING  lease: its token, PX lease_s, renewed every lease_s/3
    P:fence           STRING  counter: each lease's token is its next value (INCR), so tokens
                              only increase; expires INDEX_TTL_S, refreshed on every acquire
    P:active          ZSET    session -> lease deadline (ms, Redis clock) of every held lock;
                              expires INDEX_TTL_S (7 days), refreshed on every write
    P:ready           STREAM  "session S may have work" (field ``session``), consumer group
                              ``workers``; MAXLEN ~ ready_maxlen, expires INDEX_TTL_S, refreshed on push

How it works:

- ``push``: RPUSH q, XADD ready (one MULTI; the gateway runs the same commands in the
  script that inserts the run's record, `queue_cmds`, so a run is queued when accepted).
  Every process reads ``ready`` through the consumer group, so each message goes to one
  process.
- A message for S is turned into one attempt to take S's lock. The attempt (a Lua
  script, atomic) tries SET NX PX on the lock, records the lease in ``active``, and
  XACKs the messages that led to it, whatever the outcome: once a lock exists,
  ``active`` is what guarantees S is served again, not the stream (see below). If the
  attempt fails, the holder drains S: its "take the next run" step is atomic with its
  release (below), so a push that raced with a failed attempt is always seen by the
  holder or finds the lock free for the next message.
- The new holder first reports whatever ``qp`` holds (the run a dead holder was
  executing) to ``on_orphan`` and drops each reported run from ``qp`` (if a report
  raises, it hands the session off after a pause rather than release it with an
  unreported orphan in ``qp``), then loops: one script LREMs the finished run from
  ``qp``, checks the token, and LMOVEs the head of ``q`` to ``qp``, or, when ``q`` is
  empty, deletes the lock and the ``active`` entry in the same step. A push either
  happened before that step (the run is moved) or after it (the lock is free when its
  ready message is handled): no lost wake-up, no release/re-check dance.
- Leases: one task renews every held lock each lease_s/3 (compare token, PEXPIRE,
  ZADD active). A holder whose lease is gone (token mismatch, or no successful renewal
  for lease_s) cancels the execution it is running and leaves the run in ``qp``: the
  new holder has reported it (or will) as an orphan. This is what keeps "one run at a
  time per session" when a process stalls instead of dying.
- Fencing: a process can be paused (a VM pause, a long GC, a stuck disk) past its lease
  and resume believing it still holds it. So nothing a holder does to a session's runs
  relies on its own belief: every step that touches ``qp`` (take the next run, drop a
  finished run or a reported orphan, release) checks the token in the same script, and
  ``lease(session)`` gives the executor the (lock key, token) pair that the store checks
  atomically when it writes the run's end (``Store.end_run``). A holder that lost its
  lease can neither end its run nor remove it from ``qp``; the next holder reports it.
- Recovery, by a second loop every claim_idle_s/2 in every process:
  * a session in ``active`` whose deadline passed belongs to a dead holder: the loop
    tries its lock (counted in ``recovered``), reports the orphan and drains the queue;
  * XAUTOCLAIM (min idle claim_idle_s) takes over ready messages that a dead consumer
    read but never turned into a lock attempt (counted in ``claimed``);
  * consumers idle for a long time with no pending message are deleted from the group,
    so restarts (new consumer names) do not grow the group forever.
  Tracking held locks in ``active`` rather than keeping the stream message pending for
  the whole drain means recovery does not depend on stream entries that MAXLEN may trim
  or that another process may claim while a live holder works through a long queue.
- Within one process, the messages for a session that is already being served are
  coalesced: the running handler makes one more lock attempt for them when it is done.
- Bounds: at most ``max_sessions`` sessions are served at once by a process; the
  reader asks Redis for no more messages than it has free slots.
- ``stop()`` stops reading, lets running executions finish for ``grace_s``, then
  cancels them (their runs stay in ``qp`` as orphans for the next holder), releases
  every lock and, when a released session still has work, XADDs a fresh ready message
  so another process takes it over at once. ``kill()`` cancels everything without a
  single Redis command, as a crash would.

Limits: the stream keeps about ``ready_maxlen`` entries; if more ready messages than
that are waiting unread, the oldest are trimmed and their sessions are served again at
their next push. A queue untouched for ``queue_ttl_s`` expires with its runs. The Lua
scripts touch several keys of one session, so this needs a single Redis (not Cluster).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from clawgate.errors import StoreError
from clawgate.ids import RunId, SessionKey
from clawgate.runs.dispatch import Cancel, FinalListener
from clawgate.scaleout.fanout import RedisEventRelay
from clawgate.scaleout.redis_io import as_text, guarded, redis_call
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.state.tasks import cancel_all
from clawgate.state.ttlmap import TTLMap
from clawgate.store.base import SessionGate
from clawgate.store.records import RunRecord
from clawgate.store.redis_batch import Cmd, RedisBatcher
from clawgate.store.redis_keys import (
    GROUP,
    INDEX_TTL_S,
    QUEUE_TTL_S,
    READY_MAXLEN,
    DispatchKeys,
    queue_run_cmds,
    ready_entry_cmd,
)
from clawgate.store.redis_store import CALL_TIMEOUT_S, RedisStore

if TYPE_CHECKING:
    from clawgate.runs.service import Run

log = structlog.get_logger("clawgate.scaleout.dispatch")
T = TypeVar("T")

READ_COUNT = 64  # messages per XREADGROUP / XAUTOCLAIM
READ_BLOCK_MS = 1000  # CALL_TIMEOUT_S (and a client's socket_timeout) must be longer than this
RETRY_S = 0.5  # back-off after a Redis error in a background loop
CONSUMER_REAP_MIN_IDLE_S = 300.0  # group members idle this long with nothing pending are deleted
REAP_EVERY_TICKS = 20

Execute = Callable[[str, str], Awaitable[None]]


# -- Lua --------------------------------------------------------------------------------------------

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Try the lock and ack the ready messages that led here (either way: see the module doc).
# The lease token is the next value of the fence counter, so tokens only ever increase.
# KEYS: lock, qp, active, ready, fence; ARGV: lease_ms, session, index_ttl_s, group, msg ids...
# Returns nil when the lock is held by someone else, else {token, orphans left in qp...}.
_ACQUIRE = (
    _NOW_MS
    + """
if #ARGV > 4 then redis.call('XACK', KEYS[4], ARGV[4], unpack(ARGV, 5)) end
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[3])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
redis.call('ZADD', KEYS[3], now_ms() + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[3])
local out = redis.call('LRANGE', KEYS[2], 0, -1)
table.insert(out, 1, tostring(token))
return out
"""
)

# Finish a run and take the next one, or release the lock when the queue is empty. Only the
# lease holder touches qp: a holder that lost its lease leaves its run there for the next one.
# KEYS: lock, q, qp, active; ARGV: token, finished run id or '', lease_ms, session, list_ttl_s, index_ttl_s
# Returns {0} lock lost, {1} released (queue empty), {2, run_id} run moved to qp.
_NEXT = (
    _NOW_MS
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
if ARGV[2] ~= '' then redis.call('LREM', KEYS[3], 1, ARGV[2]) end
local r = redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT')
if not r then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[4], ARGV[4])
  return {1}
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[4], now_ms() + tonumber(ARGV[3]), ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[6])
return {2, r}
"""
)

# Release early (stop, interrupted execution); hand the session off if work remains.
# KEYS: lock, q, qp, active, ready; ARGV: token, finished run id or '', session, maxlen, index_ttl_s
# Returns 0 when the lock was not ours, 1 released, 2 released and handed off.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('LREM', KEYS[3], 1, ARGV[2]) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[3])
if redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3]) == 0 then return 1 end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[4], '*', 'session', ARGV[3])
redis.call('EXPIRE', KEYS[5], ARGV[5])
return 2
"""

# Also refreshes qp and q, so a run executing (or a backlog draining) longer than
# queue_ttl_s is not lost to expiry.
# KEYS: lock, active, qp, q; ARGV: token, lease_ms, session, list_ttl_s, index_ttl_s.
# Returns 1 renewed, 0 lost.
_RENEW = (
    _NOW_MS
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[4])
return 1
"""
)

# An orphan has been reported (it has an end): drop it from qp, if the lease is still ours.
# KEYS: lock, qp; ARGV: token, run id. Returns 1 dropped, 0 lease lost.
_DROP_ORPHAN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('LREM', KEYS[2], 1, ARGV[2])
return 1
"""

# Sessions whose lease deadline passed (by Redis' clock, so hosts' clocks do not matter).
# KEYS: active; ARGV: limit
_STALE = (
    _NOW_MS
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - 1, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)

# Delete group members with nothing pending, idle at least min_idle_ms (only the named
# one when ARGV[3] is not ''). Atomic, so a member never loses a message it just read.
# KEYS: ready; ARGV: group, min_idle_ms, name or ''
_REAP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ok, cs = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local n = 0
for _, c in ipairs(cs) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if (ARGV[3] == '' or f['name'] == ARGV[3]) and f['pending'] == 0 and f['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
"""


class _Session:
    """What this process knows about one session it is serving."""

    __slots__ = ("exec_task", "key", "last_renewed", "lost", "more", "msg_ids", "task", "token")

    def __init__(self, key: str) -> None:
        self.key = key
        self.msg_ids: dict[str, None] = {}  # ready messages not yet acked (ordered set)
        self.more = False  # messages arrived while the handler was busy: one more attempt
        self.token: str | None = None  # set while this process holds the lock
        self.lost = False
        self.last_renewed = 0.0  # time.monotonic() of the last successful renewal
        self.exec_task: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None


class RedisDispatcher:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        consumer: str,
        execute: Execute,
        on_orphan: Execute,
        lease_s: float = 10.0,
        claim_idle_s: float = 15.0,
        max_sessions: int = 256,
        queue_ttl_s: float = QUEUE_TTL_S,
        ready_maxlen: int = READY_MAXLEN,
        tasks: Supervisor | None = None,
    ) -> None:
        if lease_s <= 0 or claim_idle_s <= 0 or max_sessions < 1:
            raise ValueError("lease_s and claim_idle_s must be > 0, max_sessions >= 1")
        self.redis = redis
        # The gateway's task supervisor; a private one for a dispatcher built alone.
        self.tasks = tasks or Supervisor()
        self.keys = DispatchKeys(prefix)
        self.consumer = consumer
        self.execute = execute
        self.on_orphan = on_orphan
        self.lease_s = lease_s
        self.claim_idle_s = claim_idle_s
        self.max_sessions = max_sessions
        self.queue_ttl_s = max(1, math.ceil(queue_ttl_s))
        self.ready_maxlen = ready_maxlen
        self._lease_ms = max(1, round(lease_s * 1000))
        # The calls of serving sessions (push, lock, next, release, renew) go through one
        # auto-pipelining connection: with hundreds of sessions served at once, the calls of
        # one loop turn share one send and one read (store/redis_batch.py). Blocking reads
        # and the rare recovery calls keep the client's pool.
        self._batch = RedisBatcher(redis, timeout_s=CALL_TIMEOUT_S, name="clawgate-dispatch-batcher")
        self._acquire = self._batch.script(_ACQUIRE)
        self._next = self._batch.script(_NEXT)
        self._release = self._batch.script(_RELEASE)
        self._renew = self._batch.script(_RENEW)
        self._drop_orphan = self._batch.script(_DROP_ORPHAN)
        self._stale = redis.register_script(_STALE)
        self._reap = redis.register_script(_REAP)
        self._sessions: dict[str, _Session] = {}
        self._free = max_sessions
        self._slot_freed = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._renewer: asyncio.Task[None] | None = None
        self._stopping = False
        self._claim_cursor = "0-0"
        # counters
        self.pushed = 0
        self.executed = 0
        self.execute_errors = 0
        self.orphans = 0
        self.claimed = 0  # ready messages taken over from other consumers (XAUTOCLAIM)
        self.recovered = 0  # sessions taken over from a holder whose lease expired
        self.leases_lost = 0
        self.interrupted = 0  # executions cancelled (lease lost, or stop's grace ran out)

    # -- producer -------------------------------------------------------------------------------
    async def push(self, run_id: str, session_key: str) -> None:
        """Append a run to its session's queue; some process will execute it. (The gateway
        queues a run with its record's insert instead: `RedisStore.create_run(queue=...)`.)"""
        if not run_id or not session_key:
            raise ValueError("run_id and session_key must be non-empty")
        await self._call(_transaction(*self.queue_cmds(run_id, session_key)), _exec_ok)
        self.pushed += 1

    def queue_cmds(self, run_id: str, session_key: str) -> list[Cmd]:
        """The commands `push` runs (in a transaction), for a caller that runs them in its own
        atomic write."""
        return list(
            queue_run_cmds(
                self.keys, run_id, session_key, queue_ttl_s=self.queue_ttl_s, ready_maxlen=self.ready_maxlen
            )
        )

    def _ready_entry(self, session_key: str) -> Cmd:
        return ready_entry_cmd(self.keys, session_key, self.ready_maxlen)

    def _call(self, cmds: list[Cmd], parse: Callable[[list[Any]], T]) -> Awaitable[T]:
        """One call through the batcher (bounded by CALL_TIMEOUT_S as a whole)."""
        return self._batch.submit(cmds, parse)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._loops:
            raise RuntimeError("dispatcher already started")
        self._loops = [
            self.tasks.loop(
                "dispatch-read", lambda: self._guard("dispatch-read", self._read_loop), retry_s=RETRY_S
            ),
            self.tasks.loop(
                "dispatch-claim", lambda: self._guard("dispatch-claim", self._claim_loop), retry_s=RETRY_S
            ),
        ]
        self._renewer = self.tasks.loop(
            "dispatch-renew", lambda: self._guard("dispatch-renew", self._renew_loop), retry_s=RETRY_S
        )

    def lease(self, session_key: str) -> tuple[str, str] | None:
        """(lock key, token) of the lease this process holds on a session, None if none. A
        write fenced by it is valid only while the lock still holds the token."""
        st = self._sessions.get(session_key)
        if st is None or st.token is None or st.lost:
            return None
        return self.keys.lock(session_key), st.token

    @property
    def serving(self) -> int:
        """Sessions this process is serving now (at most max_sessions)."""
        return len(self._sessions)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop consuming; let executions finish for `grace_s`, then cancel them (their
        runs become orphans for the next holder); release every lock. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        await self.tasks.stop_loops("dispatch-read", "dispatch-claim")
        handlers = [st.task for st in self._sessions.values() if st.task is not None]
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=grace_s)
            if pending:
                for st in list(self._sessions.values()):
                    if st.exec_task is not None:
                        st.exec_task.cancel()
                _, pending = await asyncio.wait(pending, timeout=grace_s)
                await _cancel(pending)  # stuck on Redis: their leases expire on their own
        if self._renewer is not None:
            await self.tasks.stop_loops("dispatch-renew")
        try:
            await redis_call(self._reap(keys=[self.keys.ready()], args=[GROUP, 0, self.consumer]))
        except (RedisError, OSError) as exc:
            log.warning("dispatch: could not leave the consumer group", error=str(exc))
        await self._batch.close()

    async def kill(self) -> None:
        """Crash simulation for tests: cancel every task, send nothing to Redis (no
        release, no ack). Locks expire by their lease; other processes recover."""
        self._stopping = True
        tasks: list[asyncio.Task[None]] = []
        for st in self._sessions.values():
            tasks += [t for t in (st.task, st.exec_task) if t is not None]
        await self.tasks.stop_loops("dispatch-read", "dispatch-claim", "dispatch-renew")
        await _cancel(tasks)
        await self._batch.abort()

    # -- consuming --------------------------------------------------------------------------------
    async def _guard(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await guarded(
            name, loop, log=log, label="dispatch", retry_s=RETRY_S, on_error=self.tasks.record_failure
        )

    async def _ensure_group(self) -> None:
        try:
            await redis_call(self.redis.xgroup_create(self.keys.ready(), GROUP, id="0", mkstream=True))
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await redis_call(self.redis.expire(self.keys.ready(), INDEX_TTL_S))

    async def _read_loop(self) -> None:
        await self._ensure_group()
        while True:
            await self._reserve(0)  # wait for a free slot
            # Reserve at most half of the free slots for the blocking read: the other half stays
            # available to the recovery pass, which would otherwise never find a free slot while
            # the reader sits in XREADGROUP BLOCK holding them all (dead holders never recovered).
            n = self._reserve_nowait(max(1, min(READ_COUNT, self._free // 2)))
            try:
                resp = await redis_call(
                    self.redis.xreadgroup(
                        GROUP, self.consumer, {self.keys.ready(): ">"}, count=n, block=READ_BLOCK_MS
                    )
                )
            except ResponseError as exc:
                self._unreserve(n)
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()  # the stream expired, and its group with it
                continue
            except BaseException:
                self._unreserve(n)
                raise
            entries = [e for _, msgs in _streams(resp) for e in msgs]
            self._dispatch(entries, n)

    async def _claim_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self.claim_idle_s / 2)
            tick += 1
            try:
                await self.claim_once(reap=tick % REAP_EVERY_TICKS == 0)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()

    async def claim_once(self, *, reap: bool = False) -> None:
        """One recovery pass: sessions of expired leases, then ready messages of dead consumers."""
        k = self.keys
        n = self._reserve_nowait(READ_COUNT)
        if n:
            try:
                stale = [as_text(s) for s in await redis_call(self._stale(keys=[k.active()], args=[n]))]
            except BaseException:
                self._unreserve(n)
                raise
            fresh = [s for s in stale if s not in self._sessions]
            self.recovered += len(fresh)
            self._dispatch([(None, s) for s in fresh], n)
        n = self._reserve_nowait(READ_COUNT)
        if n:
            try:
                resp = await redis_call(
                    self.redis.xautoclaim(
                        k.ready(),
                        GROUP,
                        self.consumer,
                        min_idle_time=max(1, round(self.claim_idle_s * 1000)),
                        start_id=self._claim_cursor,
                        count=n,
                    )
                )
            except BaseException:
                self._unreserve(n)
                raise
            self._claim_cursor = as_text(resp[0])
            entries = [(as_text(mid), _session_of(fields)) for mid, fields in resp[1]]
            self.claimed += len(entries)
            self._dispatch(entries, n)
        if reap:
            idle_ms = round(max(CONSUMER_REAP_MIN_IDLE_S, 20 * self.claim_idle_s) * 1000)
            await redis_call(self._reap(keys=[k.ready()], args=[GROUP, idle_ms, ""]))

    # -- slots (max_sessions) ------------------------------------------------------------------------
    async def _reserve(self, want: int) -> int:
        while self._free == 0:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        return self._reserve_nowait(want)

    def _reserve_nowait(self, want: int) -> int:
        n = min(want, self._free)
        self._free -= n
        return n

    def _unreserve(self, n: int) -> None:
        if n:
            self._free += n
            self._slot_freed.set()

    def _dispatch(self, entries: Iterable[tuple[str | None, str | None]], reserved: int) -> None:
        """Hand (msg_id, session) pairs to per-session handlers; each new handler takes
        one reserved slot (there are never more entries than slots reserved)."""
        malformed: list[str] = []
        for msg_id, session in entries:
            if session is None:
                if msg_id is not None:
                    malformed.append(msg_id)
                continue
            st = self._sessions.get(session)
            if st is not None:
                st.more = True
            else:
                st = _Session(session)
                self._sessions[session] = st
                reserved -= 1
                st.task = self.tasks.spawn(self._serve_session(st), name="dispatch-session")
            if msg_id is not None:
                st.msg_ids[msg_id] = None
        self._unreserve(reserved)
        if malformed:
            self.tasks.spawn(self._ack(malformed), name="dispatch-ack")

    async def _ack(self, ids: list[str]) -> None:
        try:
            await redis_call(self.redis.xack(self.keys.ready(), GROUP, *ids))
        except (RedisError, OSError) as exc:  # an outage, not a bug: the messages stay pending
            log.warning("dispatch: background ack failed", error=str(exc))

    # -- serving one session ------------------------------------------------------------------------
    async def _serve_session(self, st: _Session) -> None:
        try:
            while True:
                ids = list(st.msg_ids)
                st.msg_ids.clear()
                st.more = False
                await self._hold_and_drain(st, ids)
                if not st.more:
                    break
                if self._stopping:
                    await self._hand_off(st)
                    break
        except (RedisError, OSError) as exc:
            # Unacked messages stay pending (XAUTOCLAIM); a held lock lapses (recovery).
            log.warning("dispatch: redis error while serving a session", session=st.key, error=str(exc))
        except Exception as exc:  # a bug: counted
            log.exception("dispatch: session handler failed", session=st.key)
            self.tasks.record_failure("dispatch-session", exc)
        finally:
            # No await between the `more` check above and this removal: a message
            # dispatched after it starts a new handler.
            self._sessions.pop(st.key, None)
            self._unreserve(1)

    async def _hold_and_drain(self, st: _Session, ids: list[str]) -> None:
        k, s = self.keys, st.key
        got = await self._call(
            [
                self._acquire(
                    keys=[k.lock(s), k.processing(s), k.active(), k.ready(), k.fence()],
                    args=[self._lease_ms, s, INDEX_TTL_S, GROUP, *ids],
                )
            ],
            _first,
        )
        if got is None:
            return  # held elsewhere: that holder drains the queue
        token = as_text(got[0])
        st.token, st.lost, st.last_renewed = token, False, time.monotonic()
        try:
            reported = await self._report_orphans(st, [as_text(r) for r in got[1:]])
            if reported == "lost":
                return  # the next holder reports what is left
            if reported == "failed":
                # An orphan without an end must not sit in qp behind a released lock (nothing
                # would look at it again before the next push): pause, then hand the session
                # off with its work, so a holder (this process or another) retries the report.
                await asyncio.sleep(RETRY_S)
                await self._release_lock(st, "")
                return
            done = ""
            while True:
                if self._stopping:
                    await self._release_lock(st, done)
                    return
                step = await self._call(
                    [
                        self._next(
                            keys=[k.lock(s), k.queue(s), k.processing(s), k.active()],
                            args=[token, done, self._lease_ms, s, self.queue_ttl_s, INDEX_TTL_S],
                        )
                    ],
                    _first,
                )
                if int(step[0]) == 0:
                    if not st.lost:
                        self._lose(st)  # found out here before the renewer did
                    return
                if int(step[0]) == 1:
                    return  # queue empty, lock released
                st.last_renewed = time.monotonic()
                run_id = as_text(step[1])
                if not await self._run_one(st, run_id):
                    # Interrupted: the run stays in qp, reported by the next holder.
                    await self._release_lock(st, "")
                    return
                done = run_id
        finally:
            st.token = None

    async def _run_one(self, st: _Session, run_id: str) -> bool:
        """Execute one run; False when the execution was cancelled (lease lost, stop)."""
        st.exec_task = asyncio.create_task(self._execute_logged(run_id, st.key))
        try:
            await st.exec_task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # this handler itself is cancelled (kill, or stop's last resort)
            self.interrupted += 1
            return False
        finally:
            st.exec_task = None
        self.executed += 1
        return True

    async def _execute_logged(self, run_id: str, session: str) -> None:
        try:
            await self.execute(run_id, session)
        except Exception:
            self.execute_errors += 1
            log.exception("dispatch: execute raised", run_id=run_id, session=session)

    async def _report_orphans(self, st: _Session, orphans: list[str]) -> Literal["ok", "failed", "lost"]:
        """Report each orphan, then drop it from qp (only while the lease is ours). "lost":
        the lease went meanwhile; "failed": a report raised. Either way the orphans not
        dropped stay in qp for the next holder."""
        k, token = self.keys, st.token
        assert token is not None
        outcome: Literal["ok", "failed", "lost"] = "ok"
        for run_id in orphans:
            try:
                await self.on_orphan(run_id, st.key)
            except Exception:
                log.exception("dispatch: on_orphan raised; the next holder retries", run_id=run_id)
                outcome = "failed"
                continue
            dropped = await self._call(
                [self._drop_orphan(keys=[k.lock(st.key), k.processing(st.key)], args=[token, run_id])],
                _first,
            )
            if not int(dropped):
                if not st.lost:
                    self._lose(st)
                return "lost"
            self.orphans += 1
        return outcome

    async def _release_lock(self, st: _Session, done: str) -> None:
        k, s = self.keys, st.key
        assert st.token is not None
        await self._call(
            [
                self._release(
                    keys=[k.lock(s), k.queue(s), k.processing(s), k.active(), k.ready()],
                    args=[st.token, done, s, self.ready_maxlen, INDEX_TTL_S],
                )
            ],
            _first,
        )

    async def _hand_off(self, st: _Session) -> None:
        """Stopping with messages not yet turned into a lock attempt: republish, then ack."""
        ids = list(st.msg_ids)
        st.msg_ids.clear()
        k = self.keys
        cmds: list[Cmd] = [self._ready_entry(st.key), ("EXPIRE", k.ready(), INDEX_TTL_S)]
        if ids:
            cmds.append(("XACK", k.ready(), GROUP, *ids))
        await self._call(_transaction(*cmds), _exec_ok)

    # -- leases --------------------------------------------------------------------------------
    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self.renew_once()

    async def renew_once(self) -> None:
        held = [(st, st.token) for st in self._sessions.values() if st.token is not None and not st.lost]
        if not held:
            return
        k = self.keys
        calls = [
            self._call(
                [
                    self._renew(
                        keys=[k.lock(st.key), k.active(), k.processing(st.key), k.queue(st.key)],
                        args=[token, self._lease_ms, st.key, self.queue_ttl_s, INDEX_TTL_S],
                    )
                ],
                _first,
            )
            for st, token in held
        ]
        results: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
        now = time.monotonic()
        for (st, token), res in zip(held, results, strict=True):
            if st.token != token:
                continue  # released (or re-acquired) meanwhile
            if isinstance(res, BaseException):
                if now - st.last_renewed < self.lease_s:
                    continue  # transient: the lease may still be ours
            elif int(res) == 1:
                st.last_renewed = now
                continue
            self._lose(st)

    def _lose(self, st: _Session) -> None:
        """The lease is gone: someone else may hold the session; stop executing in it."""
        st.lost = True
        self.leases_lost += 1
        log.warning("dispatch: lease lost", session=st.key)
        if st.exec_task is not None:
            st.exec_task.cancel()


# -- helpers ----------------------------------------------------------------------------------------


def _first(replies: list[Any]) -> Any:
    return replies[0]


def _transaction(*cmds: Cmd) -> list[Cmd]:
    return [("MULTI",), *cmds, ("EXEC",)]


def _exec_ok(replies: list[Any]) -> None:
    """The replies of `_transaction`: raise if the transaction or one of its commands failed."""
    done = replies[-1]
    if not isinstance(done, list):
        raise ResponseError(f"transaction not executed: {done!r}")
    failed = next((r for r in done if isinstance(r, Exception)), None)
    if failed is not None:
        raise failed


def _session_of(fields: Any) -> str | None:
    if not isinstance(fields, dict):
        return None
    v = fields.get(b"session", fields.get("session"))
    return as_text(v) if isinstance(v, bytes | str) and v else None


def _streams(resp: Any) -> list[tuple[Any, list[tuple[str, str | None]]]]:
    """XREADGROUP reply -> [(stream, [(msg_id, session)])]. RESP2 gives
    [[stream, entries]], RESP3 {stream: [entries]} (one more level)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        items = [(stream, nested[0] if nested else []) for stream, nested in resp.items()]
    else:
        items = [(stream, entries) for stream, entries in resp]
    return [
        (stream, [(as_text(mid), _session_of(fields)) for mid, fields in entries])
        for stream, entries in items
    ]


async def _cancel(tasks: Iterable[asyncio.Task[None]], timeout_s: float = 10.0) -> None:
    late = await cancel_all(tasks, timeout_s)
    if late:
        log.error("dispatch: tasks ignored cancellation", tasks=late)


# -- the run service's port -----------------------------------------------------------------------


class RedisRunDispatch:
    """The run service's `RunDispatch` on Redis: accepted runs go to the shared queues, an
    abort is broadcast to every process, and the end of a run executed elsewhere reaches
    the listeners registered here (its "done" message, or the member's store reconcile)."""

    def __init__(
        self,
        dispatcher: RedisDispatcher,
        fanout: RedisEventRelay,
        store: RedisStore,
        clock: Clock,
        registry: StateRegistry,
        *,
        ttl_s: float,
        max_runs: int,
        tasks: Supervisor | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.tasks = tasks or Supervisor()
        self.fanout = fanout
        self.store = store
        # Per run: handle -> listener, so a cancelled wait leaves in O(1) (a list.remove per
        # cancel made cancelling many parked waits quadratic).
        self._handles = itertools.count(1)
        self.waiters: TTLMap[RunId, dict[int, FinalListener]] = TTLMap(
            "remote_run_waiters", clock, ttl_s=ttl_s, max_size=max_runs
        )
        registry.register(self.waiters)

    def check_room(self, session_key: SessionKey) -> None:
        return None  # the shared queues are bounded by their expiry, not by this process's lanes

    async def insert(
        self, record: RunRecord, *, reuse_after_s: float, now: float, gate: SessionGate | None
    ) -> RunRecord | None:
        # The record, its indexes, the session's queue and the ready-stream entry in one
        # script: a run is never stored without being queued, or queued twice by a retry
        # (a retry finds the record and joins it). The store's pipeline retries a broken
        # connection; an outage fails the accept, with nothing written.
        return await self.store.create_run(
            record,
            reuse_after_s=reuse_after_s,
            now=now,
            gate=gate,
            queue=self.dispatcher.queue_cmds(record.run_id, record.session_key),
        )

    async def push(self, run: Run) -> None:
        return None  # queued by `insert`, with the record

    def executes_elsewhere(self, run: Run | None) -> bool:
        # Not tracked here, or tracked without a task: accepted here and queued, or executing
        # in another process (a run this process executes has its task).
        return run is None or run.task is None

    def abort(self, run_id: RunId) -> None:
        self.fanout.publish_abort(run_id)

    def listening(self, run_id: RunId) -> int:
        listeners = self.waiters.get(run_id)
        return 0 if listeners is None else len(listeners)

    def listen(self, run_id: RunId, listener: FinalListener) -> Cancel:
        """Call `listener` with the final record when another process finishes the run."""
        listeners = self.waiters.get(run_id)
        if listeners is None:
            listeners = {}
            self.waiters.set(run_id, listeners)
        handle = next(self._handles)
        listeners[handle] = listener

        def cancel() -> None:
            current = self.waiters.get(run_id)
            if current is not None and current.pop(handle, None) is not None and not current:
                self.waiters.pop(run_id)

        # The run may have ended between the caller's store read and this registration.
        self.tasks.spawn(self._recheck(run_id), name="dispatch-recheck")
        return cancel

    def settle(self, rec: RunRecord) -> None:
        """The run ended (elsewhere, or here): every listener gets its final record, once."""
        run_id = RunId(rec.run_id)
        for listener in (self.waiters.pop(run_id) or {}).values():
            try:
                listener(rec)
            except Exception:
                log.exception("remote final listener failed", run_id=run_id)

    async def _recheck(self, run_id: RunId) -> None:
        try:
            rec = await self.store.get_run(run_id)
        except StoreError:  # an outage, not a bug: the member's reconcile settles the wait
            return
        if rec is not None and rec.is_final:
            for listener in (self.waiters.pop(run_id) or {}).values():
                listener(rec)
