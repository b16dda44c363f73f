"""The shared Redis store: the same records as SQLite, with native expiry for every TTL.

Every key lives under ``f"{prefix}:"`` and every key expires (records with their
own TTL, index sets/zsets with a long expiry refreshed on each write), so nothing
lives forever. One writer task drains a queue and sends what it finds as one
pipeline (``transaction=False``), mirroring the SQLite writer's group commit.
Reads go through the same queue, after the writes enqueued before them, so a
process reads what it was told was done.

Key layout (``P`` is the prefix; all names are built by ``StoreKeys``, store/redis_keys.py,
with every expiry constant named below):

    P:session:{key}              HASH   session fields; expires session_ttl_s (30 days by default),
                                        refreshed by put_session / append_message / reset_session
    P:messages:{key}             LIST   transcript, JSON per message, trimmed to transcript_max; same expiry
    P:sessions                   ZSET   session key -> updated_at (list_sessions)
    P:sessions:expiry            ZSET   session key -> expiry deadline (ms); trims P:sessions
    P:run:{run_id}               STRING RunRecord JSON; open runs 2 days, finished runs run_result_ttl_s
                                        once final, never rewritten (see end_run)
    P:runs:open                  SET    ids of queued/running runs (unfinished_runs)
    P:runs:ended                 ZSET   run id -> ended_at (sweep_runs), capped in size
    P:runs:all                   ZSET   run id -> record expiry deadline (ms) (count_runs)
    P:runs:session:{key}         ZSET   run id -> record expiry deadline (ms) (count_runs(key))
    P:idem:{key}                 STRING run id; SET NX PX ttl
    P:sub:{run_id}               STRING SubagentRecord JSON; safety expiry (see put_subagent)
    P:subs:all                   ZSET   run id -> insertion order (list_subagents, count_subagents)
    P:subs:requester:{key}       ZSET   run id -> insertion order (list_subagents(requester))
    P:subs:expiry                ZSET   run id -> expires_at (due_subagents)
    P:subs:live                  SET    ids of live records (live_subagents)
    P:sub:claim:{run_id}         STRING "owner deadline": the process working on the record (claim_subagent)
    P:sub:quarantine:{run_id}    STRING an undecodable record moved aside; expires QUARANTINE_TTL_S

Index entries pointing at records that expired natively are dropped lazily by the
reads that meet them; the deadline-scored zsets are trimmed on write.

A run has exactly one end: `end_run` writes a final record in one script that checks the
stored record is not final yet and, for a run executed from the shared queue, that the
writer still holds its session's lease (the fence: the lock key holds the writer's token).
A process paused past its lease can therefore no longer end a run that another process has
taken over, and an open record ("running") never replaces an end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from clawgate.errors import StoreError
from clawgate.protocol.constants import FINAL_STATUSES
from clawgate.store.base import Fence, SessionGate, SessionStamp, Store, done_future
from clawgate.store.base import log_write_failure as _consume
from clawgate.store.records import (
    RunRecord,
    SessionMeta,
    SubagentRecord,
    TranscriptMessage,
)
from clawgate.store.redis_batch import Cmd, RedisBatcher
from clawgate.store.redis_client import CancelSafeRedis
from clawgate.store.redis_keys import (
    CLAIM_SAFETY_S,
    DEFAULT_SESSION_TTL_S,
    INDEX_TTL_S,
    OPEN_RUN_TTL_S,
    QUARANTINE_TTL_S,
    RUNS_ENDED_CAP,
    SUB_SAFETY_MARGIN_S,
    StoreKeys,
)
from clawgate.store.run_pages import RunsPage, RunsPageQuery, parse_int_cursor

log = structlog.get_logger("clawgate.store.redis")
T = TypeVar("T")

PAGE = 256
CALL_TIMEOUT_S = 30.0  # longest wait for one reply (the features' client) or one pipeline (the writer's)

# -- Lua (atomic multi-step updates) ----------------------------------------------------------------

# Upserts a session, keeping created_at; drops up to 128 expired index entries.
# KEYS: session, messages, sessions index, sessions expiry
# ARGV: key, deadline_ms, index_deadline_ms, now_ms, created_at, updated_at, n_set, (field, value)*n_set,
#       fields to delete...
_PUT_SESSION = """
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[5])
local n = tonumber(ARGV[7])
local args = {}
for i = 8, 7 + 2 * n do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
for i = 8 + 2 * n, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[4], 'LIMIT', 0, 128)
if #stale > 0 then
  redis.call('ZREM', KEYS[3], unpack(stale))
  redis.call('ZREM', KEYS[4], unpack(stale))
end
redis.call('PEXPIREAT', KEYS[3], ARGV[3])
redis.call('PEXPIREAT', KEYS[4], ARGV[3])
return 1
"""

# KEYS: session, messages, sessions index, sessions expiry
# ARGV: key, new_session_id, updated_at, deadline_ms, index_deadline_ms
_RESET_SESSION = """
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'session_id', ARGV[2], 'updated_at', ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
  redis.call('PEXPIREAT', KEYS[3], ARGV[5])
  redis.call('PEXPIREAT', KEYS[4], ARGV[5])
end
return 1
"""

# KEYS: idem key; ARGV: run_id, ttl_ms. Returns nil when claimed, else the bound run id.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
"""

# Runs the commands `_flat` put into ARGV from index FIRST: each one's length, then its words
# (no JSON to encode here or to decode in the script).
_RUN_FLAT = """
local i = FIRST
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end"""

# Inserts a run unless one with the same id is unfinished or was accepted less than
# reuse_after_s ago; returns that record (JSON) or nil after running the insert commands.
# With ARGV[3] '1', a session with a token budget returns its hash instead (for the gate).
# KEYS: run, session; ARGV: now, reuse_after_s, check, then the put_run commands (`_flat`)
_CREATE_RUN = (
    """
local raw = redis.call('GET', KEYS[1])
if raw then
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' then
    local final = %s
    local accepted = tonumber(rec.accepted_at) or 0
    if not final or accepted + tonumber(ARGV[2]) > tonumber(ARGV[1]) then return raw end
  end
end
if ARGV[3] == '1' then
  local budget = tonumber(redis.call('HGET', KEYS[2], 'budget_tokens'))
  if budget and budget > 0 then return redis.call('HGETALL', KEYS[2]) end
end
"""
    + _RUN_FLAT.replace("FIRST", "4")
    + """
return false
"""
).replace("%s", " or ".join(f"rec.status == '{s}'" for s in sorted(FINAL_STATUSES)))


# Replaces a subagent record only if it still exists (a sweep elsewhere may have removed it).
# KEYS: sub, subs_expiry, subs_live, subs_all, by_requester
# ARGV: json, deadline_ms, expires_at ('' for none), live ('1'/'0'), idx_deadline_ms, run_id
_UPDATE_SUB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], ARGV[6])
else redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6]) end
if ARGV[4] == '1' then redis.call('SADD', KEYS[3], ARGV[6])
else redis.call('SREM', KEYS[3], ARGV[6]) end
for i = 2, 5 do redis.call('PEXPIREAT', KEYS[i], ARGV[5]) end
return 1
"""

# Takes or extends a claim on a subagent record. Deadlines are on the gateways' clock (the
# one the records' expiry uses); the key also expires natively so a claim never outlives it.
# KEYS: sub, claim; ARGV: owner, now, lease deadline, native expiry ms
_CLAIM_SUB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('GET', KEYS[2])
if cur then
  local owner, deadline = string.match(cur, '^(%S+) (%S+)$')
  if owner and owner ~= ARGV[1] and tonumber(deadline) > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. ARGV[3], 'PX', ARGV[4])
return 1
"""

# KEYS: claim; ARGV: owner
_RELEASE_SUB = """
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^(%S+) ') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# Moves an undecodable record aside and out of every index.
# KEYS: sub, quarantine, subs_all, subs_expiry, subs_live; ARGV: run_id, ttl_ms
_QUARANTINE_SUB = """
local raw = redis.call('GET', KEYS[1])
if raw then
  redis.call('SET', KEYS[2], raw, 'PX', ARGV[2])
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
return 1
"""

# Appends to a transcript only if its session exists (never re-creates a deleted session).
# KEYS: session, messages, sessions expiry, sessions index
# ARGV: key, message json, transcript max, deadline_ms, idx_deadline_ms, updated_at
_APPEND_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('PEXPIREAT', KEYS[2], ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[6])
redis.call('ZADD', KEYS[3], 'XX', ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[4], 'XX', ARGV[6], ARGV[1])
redis.call('PEXPIREAT', KEYS[3], ARGV[5])
redis.call('PEXPIREAT', KEYS[4], ARGV[5])
return 1
"""

# Deletes a session with its transcript unless it was updated after the stamp read.
# KEYS: session, messages, sessions index, sessions expiry; ARGV: key, stamp, dry_run (0/1)
# Returns 1 when a session was (or, dry, would be) deleted, 0 otherwise.
_DELETE_IF_IDLE = """
local u = redis.call('HGET', KEYS[1], 'updated_at')
if u and tonumber(u) > tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '1' then return u and 1 or 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if u then return 1 end
return 0
"""

# Drops the oldest messages past the bounds (bytes of content, as on SQLite; the newest
# message is always kept) and counts them on the session hash.
# KEYS: messages, session; ARGV: max_messages, max_bytes, dry_run (0/1). Returns the count.
_TRIM_TRANSCRIPT = """
local n = redis.call('LLEN', KEYS[1])
local max_messages = tonumber(ARGV[1])
local max_bytes = tonumber(ARGV[2])
local items = redis.call('LRANGE', KEYS[1], -max_messages, -1)
local keep, bytes = 0, 0
for i = #items, 1, -1 do
  local ok, m = pcall(cjson.decode, items[i])
  local size = string.len(items[i])
  if ok and type(m) == 'table' and type(m.content) == 'string' then size = string.len(m.content) end
  if keep >= 1 and bytes + size > max_bytes then break end
  keep = keep + 1
  bytes = bytes + size
end
local drop = n - keep
if drop <= 0 or ARGV[3] == '1' then return math.max(drop, 0) end
redis.call('LTRIM', KEYS[1], -keep, -1)
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HINCRBY', KEYS[2], 'dropped', drop) end
return drop
"""
# Writes a run record unless the stored one is final (a run has exactly one end: neither a
# second end nor a late "running" may replace it) or the fence is gone (KEYS[2], when given,
# no longer holds the token: the writer lost the lease of the run's session).
# KEYS: run key [, fence key]; ARGV: fence token or '', then the put_run commands (`_flat`)
# Returns {0} written, {1, stored} the stored record is final, {2[, stored]} fenced out.
_WRITE_RUN = (
    """
local raw = redis.call('GET', KEYS[1])
if raw then
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' and (%s) then return {1, raw} end
end
if #KEYS > 1 and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  if raw then return {2, raw} end
  return {2}
end
"""
    + _RUN_FLAT.replace("FIRST", "2")
    + """
return {0}
"""
).replace("%s", " or ".join(f"rec.status == '{s}'" for s in sorted(FINAL_STATUSES)))


async def _warn_if_not_persistent(client: aioredis.Redis, url: str) -> None:
    """Warn when this Redis keeps nothing across a restart (no AOF, no RDB snapshots): every
    run, session and transcript would be gone after it restarts. A Redis with CONFIG disabled
    (renamed, or an ACL without it) is not checked."""
    try:
        aof = await client.config_get("appendonly")
        save = await client.config_get("save")
    except (RedisError, OSError) as exc:
        log.info("redis persistence not checked: CONFIG GET refused", error=str(exc))
        return
    if persistence_of(_config_value(aof, "appendonly"), _config_value(save, "save")) == "none":
        log.warning(
            "the store's redis persists nothing (appendonly no, save ''): a redis restart loses "
            "every run, session and transcript; see docs/reliability.md",
            url=_redact(url),
        )


def _config_value(reply: dict[Any, Any], name: str) -> str:
    value = reply.get(name, reply.get(name.encode(), ""))
    return _s(value) if value is not None else ""


def persistence_of(appendonly: str, save: str) -> str:
    """'aof', 'rdb' or 'none', from the CONFIG GET values of `appendonly` and `save`."""
    if appendonly.strip().lower() == "yes":
        return "aof"
    return "rdb" if save.strip() else "none"


# -- codecs --------------------------------------------------------------------------------------------

_enc = msgspec.json.Encoder()
_run_dec = msgspec.json.Decoder(RunRecord)
_sub_dec = msgspec.json.Decoder(SubagentRecord)
_msg_dec = msgspec.json.Decoder(TranscriptMessage)


class RedisStore(Store):
    kind = "redis"
    shared_by_processes = True
    retries_end_writes = True

    def is_outage(self, exc: BaseException) -> bool:
        return isinstance(exc, RedisError | OSError)

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "clawgate",
        run_result_ttl_s: float = 600,
        session_ttl_s: float | None = None,
        subagent_max_ttl_s: float = 86400 * 2,
        transcript_max: int = 10000,
        batch_max: int = 512,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.keys = StoreKeys(prefix)
        self.run_result_ttl_s = run_result_ttl_s
        self.session_ttl_s = session_ttl_s
        self.subagent_max_ttl_s = subagent_max_ttl_s
        self.transcript_max = transcript_max
        self.batch_max = batch_max
        self._client: aioredis.Redis | None = None
        self._batcher: RedisBatcher | None = None
        self._closed = False
        self._seq = 0.0
        # Connection state, for status and /metrics: redis-py reconnects on the next command
        # after a failure, so "down" means "the last pipeline failed" and a success after a
        # failure counts as one reconnect.
        self.up = True
        self.last_error: str | None = None
        self.failures = 0
        self.reconnects = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def client(self) -> aioredis.Redis:
        """The connection (optional features with their own keys, e.g. cron, use it directly)."""
        if self._client is None:
            raise StoreError("store is not open")
        return self._client

    # -- lifecycle ----------------------------------------------------------------------
    def _connect(self, socket_timeout: float | None) -> aioredis.Redis:
        return CancelSafeRedis.from_url(
            self.url,
            socket_connect_timeout=5,
            socket_timeout=socket_timeout,
            # After an outage the pool still holds connections Redis closed: each command gets a
            # fresh one a few times before its failure counts as an outage.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
            retry_on_error=[RedisConnectionError],
        )

    async def open(self) -> None:
        client = self._connect(CALL_TIMEOUT_S)
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreError(f"cannot reach redis at {_redact(self.url)}: {exc}") from exc
        self._client = client
        await _warn_if_not_persistent(client, self.url)
        # The writer's own connection has no per-read timeout: redis-py would arm one for each
        # reply of a pipeline (hundreds per batch; 12% of the gateway's CPU on the Redis path).
        # The batcher bounds the whole pipeline instead, with the same limit.
        self._batcher = RedisBatcher(
            self._connect(None),
            timeout_s=CALL_TIMEOUT_S,
            batch_max=self.batch_max,
            wrap_error=_store_error,
            on_outcome=self._note_outcome,
            name="clawgate-redis-writer",
        )
        self._batcher.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            await self._batcher.close()
            await self._batcher.client.aclose()
        if self._client is not None:
            await self._client.aclose()

    async def ping(self) -> bool:
        if self._closed or self._batcher is None or not self._batcher.running:
            return False
        try:
            return bool(await asyncio.wait_for(self._submit([("PING",)], _first), 5))
        except (TimeoutError, StoreError):
            return False

    def barrier(self) -> Awaitable[None]:
        return self._submit([], _none)

    def send(self, cmds: Sequence[Cmd]) -> Awaitable[None]:
        """Send `cmds`, in order, with the store's next pipeline: an optional feature's write
        (the usage ledger's, once per run) shares the round trip of the runs' writes instead
        of taking one of its own. Awaiting it waits for Redis' answer; a failed command
        raises StoreError."""
        return self._submit(cmds, _none)

    def _note_outcome(self, exc: BaseException | None) -> None:
        if exc is None:
            self._note_up()
        else:
            log.error("redis pipeline failed", error=str(exc))
            self._note_down(exc)

    def _note_down(self, exc: BaseException) -> None:
        if self.up:
            log.warning("redis store unreachable", url=_redact(self.url), error=str(exc))
        self.up = False
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _note_up(self) -> None:
        if not self.up:
            self.reconnects += 1
            log.info("redis store reachable again", url=_redact(self.url), reconnects=self.reconnects)
        self.up = True

    def connection(self) -> dict[str, object]:
        """The connection state shown by `status` and /metrics."""
        return {
            "up": self.up,
            "lastError": self.last_error,
            "failures": self.failures,
            "reconnects": self.reconnects,
        }

    def _submit(self, cmds: Sequence[Cmd], parse: Callable[[list[Any]], T]) -> asyncio.Future[T]:
        if self._closed or self._batcher is None:
            fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            fut.set_exception(StoreError("store is closed" if self._closed else "store is not open"))
            return fut
        return self._batcher.submit(cmds, parse)

    def _write(self, cmds: Sequence[Cmd]) -> asyncio.Future[None]:
        fut = self._submit(cmds, _none)
        # Writes nobody awaits must not log "exception never retrieved".
        fut.add_done_callback(_consume)
        return fut

    # -- expiry helpers --------------------------------------------------------------------------
    @property
    def _session_ttl(self) -> float:
        return self.session_ttl_s if self.session_ttl_s is not None else DEFAULT_SESSION_TTL_S

    def _deadlines(self, ttl_s: float) -> tuple[int, int, int]:
        """(now_ms, record deadline ms, index deadline ms): indexes outlive what they point at."""
        now = time.time()
        deadline = _ms(now + max(ttl_s, 0.001))
        return _ms(now), deadline, max(_ms(now + INDEX_TTL_S), deadline)

    def _next_seq(self) -> float:
        self._seq = max(time.time(), self._seq + 1e-6)
        return self._seq

    # -- sessions ----------------------------------------------------------------------------------
    def put_session(self, meta: SessionMeta) -> Awaitable[None]:
        k = self.keys
        now_ms, deadline, idx_deadline = self._deadlines(self._session_ttl)
        fields: list[str | float] = [
            "session_id", meta.session_id,
            "updated_at", repr(meta.updated_at),
            "kind", meta.kind,
            "agent_id", meta.agent_id,
        ]  # fmt: skip
        if meta.depth:  # only written when known: a touch that re-creates the metadata does not know it
            fields += ["depth", meta.depth]
        if meta.budget_tokens is not None:  # the same: never dropped by a touch that does not know it
            fields += ["budget_tokens", meta.budget_tokens]
        drop: list[str] = []
        for name, value in (("label", meta.label), ("model", meta.model)):
            if value is None:
                drop.append(name)
            else:
                fields += [name, value]
        cmd: Cmd = (
            "EVAL", _PUT_SESSION, 4,
            k.session(meta.key), k.messages(meta.key), k.sessions_index(), k.sessions_expiry(),
            meta.key, deadline, idx_deadline, now_ms, repr(meta.created_at), repr(meta.updated_at),
            len(fields) // 2, *fields, *drop,
        )  # fmt: skip
        return self._write([cmd])

    def add_session_tokens(self, key: str, tokens: int) -> Awaitable[None]:
        """Add to a session's tokens used, only if the session exists (never re-creates it)."""
        script = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'tokens_used', ARGV[1]) end"
        return self._write([("EVAL", script, 1, self.keys.session(key), tokens)])

    async def get_session(self, key: str) -> SessionMeta | None:
        h = await self._submit([("HGETALL", self.keys.session(key))], _first)
        return _session(key, h)

    async def list_sessions(
        self, *, limit: int, updated_since: float | None = None, prefix: str | None = None
    ) -> list[SessionMeta]:
        if limit <= 0:
            return []
        k = self.keys
        lo: str | float = "-inf" if updated_since is None else updated_since
        out: list[SessionMeta] = []
        stale: list[str] = []
        offset = 0
        while len(out) < limit:
            page = max(PAGE, limit) if prefix else limit - len(out)
            ids = await self._submit(
                [("ZREVRANGEBYSCORE", k.sessions_index(), "+inf", lo, "LIMIT", offset, page)], _first
            )
            offset += len(ids)
            keys = [_s(i) for i in ids]
            if prefix:
                keys = [key for key in keys if key.startswith(prefix)]
            if keys:
                hashes = await self._submit([("HGETALL", k.session(key)) for key in keys], _all)
                for key, h in zip(keys, hashes, strict=True):
                    meta = _session(key, h)
                    if meta is None:
                        stale.append(key)
                    elif len(out) < limit:
                        out.append(meta)
            if len(ids) < page:
                break
        if stale:
            self._write([("ZREM", k.sessions_index(), *stale), ("ZREM", k.sessions_expiry(), *stale)])
        return out

    def delete_session(self, key: str) -> Awaitable[None]:
        k = self.keys
        return self._write(
            [
                ("DEL", k.session(key), k.messages(key)),
                ("ZREM", k.sessions_index(), key),
                ("ZREM", k.sessions_expiry(), key),
            ]
        )

    def reset_session(self, key: str, new_session_id: str, now: float) -> Awaitable[None]:
        k = self.keys
        _, deadline, idx_deadline = self._deadlines(self._session_ttl)
        cmd: Cmd = (
            "EVAL", _RESET_SESSION, 4,
            k.session(key), k.messages(key), k.sessions_index(), k.sessions_expiry(),
            key, new_session_id, repr(now), deadline, idx_deadline,
        )  # fmt: skip
        return self._write([cmd, ("HDEL", k.session(key), "dropped")])

    # -- transcripts -----------------------------------------------------------------------------
    def append_message(self, msg: TranscriptMessage) -> Awaitable[None]:
        return self._write(self._append_cmds(msg))

    def _append_cmds(self, msg: TranscriptMessage) -> list[Cmd]:
        k = self.keys
        _, deadline, idx_deadline = self._deadlines(self._session_ttl)
        mkey = k.messages(msg.session_key)
        return [
            ("RPUSH", mkey, _enc.encode(msg)),
            ("LTRIM", mkey, -self.transcript_max, -1),
            ("PEXPIREAT", mkey, deadline),
            # A conversation keeps its session alive.
            ("PEXPIREAT", k.session(msg.session_key), deadline),
            ("ZADD", k.sessions_expiry(), "XX", deadline, msg.session_key),
            ("PEXPIREAT", k.sessions_expiry(), idx_deadline),
            ("PEXPIREAT", k.sessions_index(), idx_deadline),
        ]

    def append_to_existing(self, msg: TranscriptMessage) -> Awaitable[bool]:
        k = self.keys
        _, deadline, idx_deadline = self._deadlines(self._session_ttl)
        key = msg.session_key
        cmd: Cmd = (
            "EVAL", _APPEND_EXISTING, 4,
            k.session(key), k.messages(key), k.sessions_expiry(), k.sessions_index(),
            key, _enc.encode(msg), self.transcript_max, deadline, idx_deadline, repr(msg.ts),
        )  # fmt: skip
        fut = self._submit([cmd], lambda res: bool(res[0]))
        fut.add_done_callback(_consume)
        return fut

    def history(self, session_key: str, limit: int) -> Awaitable[list[TranscriptMessage]]:
        if limit <= 0:
            return done_future([])
        return self._submit(
            [("LRANGE", self.keys.messages(session_key), -limit, -1)],
            lambda res: [_msg_dec.decode(r) for r in res[0]],
        )

    async def history_before(
        self, session_key: str, before: int | None, limit: int, clip_chars: int
    ) -> list[tuple[int, TranscriptMessage]]:
        # The list is trimmed from its head, so a position counts from the tail: the number of
        # newer messages. Messages appended between two pages shift it, so a later page may
        # repeat a message; it never skips one.
        skip = before or 0
        if limit <= 0:
            return []
        raw = await self._submit(
            [("LRANGE", self.keys.messages(session_key), -(skip + limit), -(skip + 1))], _first
        )
        out: list[tuple[int, TranscriptMessage]] = []
        for offset, item in enumerate(reversed(raw)):
            msg = _msg_dec.decode(item)
            if len(msg.content) > clip_chars:
                msg.content = msg.content[: clip_chars + 1]
            out.append((skip + offset + 1, msg))
        return out

    # -- runs ----------------------------------------------------------------------------------------
    def _run_cmds(self, rec: RunRecord) -> list[Cmd]:
        """The commands that store a run record with its index entries."""
        k = self.keys
        final = rec.status in FINAL_STATUSES
        ttl = self.run_result_ttl_s if final else max(OPEN_RUN_TTL_S, rec.timeout_s + 3600)
        now_ms, deadline, idx_deadline = self._deadlines(ttl)
        rid = rec.run_id
        cmds: list[Cmd] = [("SET", k.run(rid), _enc.encode(rec), "PXAT", deadline)]
        if final:
            cmds.append(("SREM", k.runs_open(), rid))
            if rec.ended_at is not None:
                cmds += [
                    ("ZADD", k.runs_ended(), rec.ended_at, rid),
                    ("ZREMRANGEBYRANK", k.runs_ended(), 0, -(RUNS_ENDED_CAP + 1)),
                ]
            else:
                cmds.append(("ZREM", k.runs_ended(), rid))
        else:
            cmds += [("SADD", k.runs_open(), rid), ("ZREM", k.runs_ended(), rid)]
        for index in (k.runs_all(), k.runs_by_session(rec.session_key)):
            cmds += [
                ("ZADD", index, deadline, rid),
                ("ZREMRANGEBYSCORE", index, "-inf", now_ms),
                ("PEXPIREAT", index, idx_deadline),
            ]
        cmds += [("PEXPIREAT", k.runs_open(), idx_deadline), ("PEXPIREAT", k.runs_ended(), idx_deadline)]
        return cmds

    def put_run(self, rec: RunRecord) -> Awaitable[None]:
        if rec.status in FINAL_STATUSES:
            return self._write(self._run_cmds(rec))
        # An open record (e.g. "running") never replaces an end another process wrote first.
        return self._write([self._write_run_cmd(rec, None)])

    def _write_run_cmd(self, rec: RunRecord, fence: Fence | None, extra: Sequence[Cmd] = ()) -> Cmd:
        keys = [self.keys.run(rec.run_id)] if fence is None else [self.keys.run(rec.run_id), fence.key]
        token = "" if fence is None else fence.token
        return ("EVAL", _WRITE_RUN, len(keys), *keys, token, *_flat([*self._run_cmds(rec), *extra]))

    async def end_run(
        self, rec: RunRecord, fence: Fence | None = None, *, extra: Sequence[Cmd] = ()
    ) -> RunRecord | None:
        # One script: the "no end yet" check, the fence check and the write (with `extra`, e.g.
        # the run's webhook delivery) are atomic. A fenced end carries its reply into the
        # transcript in the same script: written with the end it belongs to, or not at all.
        message = rec.reply_message() if fence is not None else None
        if message is not None:
            extra = [*extra, *self._append_cmds(message)]
        reply = await self._submit([self._write_run_cmd(rec, fence, extra)], _first)
        code = int(reply[0])
        if code == 0:
            return rec
        stored = _run_dec.decode(reply[1]) if len(reply) > 1 else None
        return stored if stored is not None and stored.is_final else None

    async def create_run(
        self,
        rec: RunRecord,
        *,
        reuse_after_s: float,
        now: float,
        gate: SessionGate | None = None,
        queue: Sequence[Cmd] = (),
    ) -> RunRecord | None:
        """`Store.create_run`; `queue`: commands run in the same script as the insert, only
        when the run is inserted (the shared queue's push: accepted and queued are one step,
        `RedisRunDispatch.insert`). They go first: Redis does not undo a script's writes
        when a later command of it fails, so a push that fails (a key of the wrong type)
        leaves no record behind, and the accept fails with nothing written."""
        # One script: the existence check and the insert (record plus index entries) are atomic.
        # With a gate, a session with a budget makes the script return the session's hash
        # instead of inserting; the gate decides and the insert is sent again without the
        # check (the second step is not atomic with the first: a budget is a soft bound).
        script_cmds = _flat([*queue, *self._run_cmds(rec)])
        check = gate is not None
        while True:
            cmd: Cmd = (
                "EVAL",
                _CREATE_RUN,
                2,
                self.keys.run(rec.run_id),
                self.keys.session(rec.session_key),
                repr(now),
                repr(reuse_after_s),
                "1" if check else "0",
                *script_cmds,
            )
            raw = await self._submit([cmd], _first)
            if not isinstance(raw, list):
                return _run_dec.decode(raw) if raw is not None else None
            meta = _session(rec.session_key, dict(zip(raw[::2], raw[1::2], strict=True)))
            if gate is not None and meta is not None and gate.refuses(meta):
                raise gate.refusal(meta)
            check = False

    async def get_run(self, run_id: str) -> RunRecord | None:
        raw = await self._submit([("GET", self.keys.run(run_id))], _first)
        return _run_dec.decode(raw) if raw is not None else None

    async def unfinished_runs(self) -> list[RunRecord]:
        k = self.keys
        ids = sorted(_s(i) for i in await self._submit([("SMEMBERS", k.runs_open())], _first))
        out: list[RunRecord] = []
        stale: list[str] = []
        for chunk in _chunks(ids, PAGE):
            raws = await self._submit([("MGET", *[k.run(i) for i in chunk])], _first)
            for rid, raw in zip(chunk, raws, strict=True):
                rec = _run_dec.decode(raw) if raw is not None else None
                if rec is None or rec.is_final:
                    stale.append(rid)
                else:
                    out.append(rec)
        if stale:
            self._write([("SREM", k.runs_open(), *stale)])
        out.sort(key=lambda r: r.accepted_at)
        return out

    async def count_runs(self, session_key: str | None = None) -> int:
        index = self.keys.runs_all() if session_key is None else self.keys.runs_by_session(session_key)
        # Counts the run records whose expiry deadline has not passed (the index scores).
        n = await self._submit([("ZCOUNT", index, f"({_ms(time.time())}", "+inf")], _first)
        return int(n)

    async def sweep_runs(self, before: float) -> int:
        """Finished runs expire natively; this deletes those that ended before `before` early
        and drops index entries of runs that already expired."""
        k = self.keys
        deleted = 0
        while True:
            ids = [
                _s(i)
                for i in await self._submit(
                    [("ZRANGEBYSCORE", k.runs_ended(), "-inf", before, "LIMIT", 0, PAGE)], _first
                )
            ]
            if not ids:
                break
            raws = await self._submit([("MGET", *[k.run(i) for i in ids])], _first)
            cmds: list[Cmd] = [("ZREM", k.runs_ended(), *ids), ("ZREM", k.runs_all(), *ids)]
            for rid, raw in zip(ids, raws, strict=True):
                if raw is not None:
                    cmds.append(("ZREM", k.runs_by_session(_run_dec.decode(raw).session_key), rid))
            dels = [("DEL", k.run(rid)) for rid in ids]
            results = await self._submit([*dels, *cmds], _all)
            deleted += sum(int(r) for r in results[: len(dels)])
            if len(ids) < PAGE:
                break
        return deleted

    # -- idempotency -------------------------------------------------------------------------------
    async def claim_key(self, key: str, run_id: str, ttl_s: float, now: float) -> str | None:
        # `now` is unused: Redis' own clock expires the key (PX).
        ttl_ms = max(1, round(ttl_s * 1000))
        got = await self._submit([("EVAL", _CLAIM, 1, self.keys.idem(key), run_id, ttl_ms)], _first)
        return None if got is None else _s(got)

    # -- subagents -----------------------------------------------------------------------------------
    def _sub_ttl(self, rec: SubagentRecord) -> float:
        if rec.expires_at is not None:
            return max(rec.expires_at - time.time(), 0.0) + SUB_SAFETY_MARGIN_S
        return self.subagent_max_ttl_s

    def put_subagent(self, rec: SubagentRecord) -> Awaitable[None]:
        k = self.keys
        _, deadline, idx_deadline = self._deadlines(self._sub_ttl(rec))
        rid = rec.run_id
        live = rec.cleanup_completed_at is None or not rec.ended_notified
        seq = self._next_seq()
        by_req = k.subs_by_requester(rec.requester_session_key)
        cmds: list[Cmd] = [
            ("SET", k.sub(rid), _enc.encode(rec), "PXAT", deadline),
            ("ZADD", k.subs_all(), "NX", seq, rid),
            ("ZADD", by_req, "NX", seq, rid),
            ("ZADD", k.subs_expiry(), rec.expires_at, rid)
            if rec.expires_at is not None
            else ("ZREM", k.subs_expiry(), rid),
            ("SADD", k.subs_live(), rid) if live else ("SREM", k.subs_live(), rid),
        ]
        cmds += [
            ("PEXPIREAT", index, idx_deadline)
            for index in (k.subs_all(), by_req, k.subs_expiry(), k.subs_live())
        ]
        return self._write(cmds)

    def update_subagent(self, rec: SubagentRecord) -> Awaitable[bool]:
        k = self.keys
        _, deadline, idx_deadline = self._deadlines(self._sub_ttl(rec))
        rid = rec.run_id
        live = rec.cleanup_completed_at is None or not rec.ended_notified
        cmd: Cmd = (
            "EVAL", _UPDATE_SUB, 5,
            k.sub(rid), k.subs_expiry(), k.subs_live(), k.subs_all(),
            k.subs_by_requester(rec.requester_session_key),
            _enc.encode(rec), deadline, "" if rec.expires_at is None else repr(rec.expires_at),
            "1" if live else "0", idx_deadline, rid,
        )  # fmt: skip
        fut = self._submit([cmd], lambda res: bool(res[0]))
        fut.add_done_callback(_consume)
        return fut

    async def claim_subagent(self, run_id: str, owner: str, now: float, lease_s: float) -> bool:
        k = self.keys
        native_ms = max(1, round((lease_s + CLAIM_SAFETY_S) * 1000))
        cmd: Cmd = (
            "EVAL", _CLAIM_SUB, 2, k.sub(run_id), k.sub_claim(run_id),
            owner, repr(now), repr(now + lease_s), native_ms,
        )  # fmt: skip
        return bool(await self._submit([cmd], _first))

    async def release_subagent(self, run_id: str, owner: str) -> None:
        await self._submit([("EVAL", _RELEASE_SUB, 1, self.keys.sub_claim(run_id), owner)], _none)

    async def get_subagent(self, run_id: str) -> SubagentRecord | None:
        found = await self._load_subs([run_id])
        return found[0][1] if found else None

    async def _load_subs(self, ids: list[str]) -> list[tuple[str, SubagentRecord | None]]:
        """Records by id (None: expired). An undecodable record is quarantined and left out."""
        if not ids:
            return []
        raws = await self._submit([("MGET", *[self.keys.sub(i) for i in ids])], _first)
        out: list[tuple[str, SubagentRecord | None]] = []
        bad: list[str] = []
        for rid, raw in zip(ids, raws, strict=True):
            if raw is None:
                out.append((rid, None))
                continue
            try:
                out.append((rid, _sub_dec.decode(raw)))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("undecodable subagent record quarantined", run_id=rid, error=str(exc))
                bad.append(rid)
        if bad:
            await self._quarantine(bad)
        return out

    async def _quarantine(self, ids: list[str]) -> None:
        k = self.keys
        ttl_ms = round(QUARANTINE_TTL_S * 1000)
        await self._submit(
            [
                (
                    "EVAL",
                    _QUARANTINE_SUB,
                    5,
                    k.sub(rid),
                    k.sub_quarantine(rid),
                    k.subs_all(),
                    k.subs_expiry(),
                    k.subs_live(),
                    rid,
                    ttl_ms,
                )
                for rid in ids
            ],
            _none,
        )
        self.subagents_quarantined += len(ids)

    async def list_subagents(self, requester: str | None, limit: int) -> list[SubagentRecord]:
        if limit <= 0:
            return []
        k = self.keys
        index = k.subs_all() if requester is None else k.subs_by_requester(requester)
        out: list[SubagentRecord] = []
        stale: list[str] = []
        offset = 0
        while len(out) < limit:
            page = limit - len(out)
            ids = [
                _s(i) for i in await self._submit([("ZREVRANGE", index, offset, offset + page - 1)], _first)
            ]
            offset += len(ids)
            for rid, rec in await self._load_subs(ids):
                if rec is None:
                    stale.append(rid)
                else:
                    out.append(rec)
            if len(ids) < page:
                break
        if stale:
            self._write([("ZREM", index, *stale)])
        return out

    async def live_subagents(self) -> list[SubagentRecord]:
        k = self.keys
        ids = sorted(_s(i) for i in await self._submit([("SMEMBERS", k.subs_live())], _first))
        out: list[SubagentRecord] = []
        stale: list[str] = []
        for chunk in _chunks(ids, PAGE):
            for rid, rec in await self._load_subs(chunk):
                if rec is None:
                    stale.append(rid)
                elif rec.cleanup_completed_at is None or not rec.ended_notified:
                    out.append(rec)
        if stale:
            self._write([("SREM", k.subs_live(), *stale)])
        out.sort(key=lambda r: r.created_at)
        return out

    async def due_subagents(self, now: float, limit: int) -> list[SubagentRecord]:
        if limit <= 0:
            return []
        k = self.keys
        out: list[SubagentRecord] = []
        stale: list[str] = []
        offset = 0
        while len(out) < limit:
            page = limit - len(out)
            ids = [
                _s(i)
                for i in await self._submit(
                    [("ZRANGEBYSCORE", k.subs_expiry(), "-inf", now, "LIMIT", offset, page)], _first
                )
            ]
            offset += len(ids)
            for rid, rec in await self._load_subs(ids):
                if rec is None:
                    stale.append(rid)
                elif rec.expires_at is not None and rec.expires_at <= now:
                    out.append(rec)
            if len(ids) < page:
                break
        if stale:
            self._write([("ZREM", k.subs_expiry(), *stale)])
        return out

    def delete_subagent(self, run_id: str) -> Awaitable[None]:
        # The per-requester index entry is dropped lazily by list_subagents (the
        # requester is not known here without a read).
        k = self.keys
        return self._write(
            [
                # The claim goes with the record: a sweep elsewhere holding a stale copy can
                # then no longer claim it (a claim needs the record to exist).
                ("DEL", k.sub(run_id), k.sub_claim(run_id)),
                ("ZREM", k.subs_all(), run_id),
                ("ZREM", k.subs_expiry(), run_id),
                ("SREM", k.subs_live(), run_id),
            ]
        )

    async def count_subagents(self) -> int:
        # Exact unless a record reached its safety expiry without being deleted (the sweep
        # deletes records first); such entries are dropped by the next list_subagents(None).
        return int(await self._submit([("ZCARD", self.keys.subs_all())], _first))

    # -- retention (docs/disk.md) ------------------------------------------------------------------------
    async def count_sessions(self) -> int:
        return int(await self._submit([("ZCARD", self.keys.sessions_index())], _first))

    async def stale_sessions(self, before: float, limit: int) -> list[SessionStamp]:
        raw = await self._submit(
            [
                (
                    "ZRANGEBYSCORE",
                    self.keys.sessions_index(),
                    "-inf",
                    f"({before!r}",
                    "LIMIT",
                    0,
                    limit,
                    "WITHSCORES",
                )
            ],
            _first,
        )
        return _stamps(raw)

    async def oldest_sessions(self, limit: int) -> list[SessionStamp]:
        if limit <= 0:
            return []
        raw = await self._submit([("ZRANGE", self.keys.sessions_index(), 0, limit - 1, "WITHSCORES")], _first)
        return _stamps(raw)

    async def delete_sessions_if_idle(
        self, stamps: list[SessionStamp], *, dry_run: bool = False
    ) -> list[str]:
        k = self.keys
        out: list[str] = []
        for i in range(0, len(stamps), PAGE):
            page = stamps[i : i + PAGE]
            cmds: list[Cmd] = [
                (
                    "EVAL",
                    _DELETE_IF_IDLE,
                    4,
                    k.session(key),
                    k.messages(key),
                    k.sessions_index(),
                    k.sessions_expiry(),
                    key,
                    repr(stamp),
                    int(dry_run),
                )
                for key, stamp in page
            ]
            results = await self._submit(cmds, _all)
            out += [key for (key, _), r in zip(page, results, strict=True) if int(r)]
        return out

    async def trim_transcripts(
        self, keys: list[str], max_messages: int, max_bytes: int, *, dry_run: bool = False
    ) -> int:
        k = self.keys
        total = 0
        for chunk in _chunks(keys, PAGE):
            cmds: list[Cmd] = [
                (
                    "EVAL",
                    _TRIM_TRANSCRIPT,
                    2,
                    k.messages(key),
                    k.session(key),
                    max_messages,
                    max_bytes,
                    int(dry_run),
                )
                for key in chunk
            ]
            total += sum(int(r) for r in await self._submit(cmds, _all))
        return total

    async def oversized_transcripts(self, max_messages: int, max_bytes: int, limit: int) -> list[str]:
        # Sizes in bytes are only known by reading the lists: every session is a candidate,
        # and the trim script decides.
        raw = await self._submit([("ZRANGE", self.keys.sessions_index(), 0, limit - 1)], _first)
        return [_s(r) for r in raw]

    async def transcript_dropped(self, key: str) -> int:
        raw = await self._submit([("HGET", self.keys.session(key), "dropped")], _first)
        return int(raw) if raw is not None else 0

    async def count_finished_runs_before(self, before: float) -> int:
        return int(await self._submit([("ZCOUNT", self.keys.runs_ended(), "-inf", before)], _first))

    async def prune_finished_runs(self, keep_max: int, *, dry_run: bool = False) -> int:
        k = self.keys
        excess = max(0, int(await self._submit([("ZCARD", k.runs_ended())], _first)) - keep_max)
        if dry_run or excess == 0:
            return excess
        deleted = 0
        while excess > 0:
            n = min(excess, PAGE)
            ids = [_s(i) for i in await self._submit([("ZRANGE", k.runs_ended(), 0, n - 1)], _first)]
            if not ids:
                break
            deleted += await self._delete_runs(ids)
            excess -= len(ids)
        return deleted

    async def _delete_runs(self, ids: list[str]) -> int:
        k = self.keys
        raws = await self._submit([("MGET", *[k.run(i) for i in ids])], _first)
        cmds: list[Cmd] = [("ZREM", k.runs_ended(), *ids), ("ZREM", k.runs_all(), *ids)]
        for rid, raw in zip(ids, raws, strict=True):
            if raw is not None:
                cmds.append(("ZREM", k.runs_by_session(_run_dec.decode(raw).session_key), rid))
        dels: list[Cmd] = [("DEL", k.run(rid)) for rid in ids]
        results = await self._submit([*dels, *cmds], _all)
        return sum(int(r) for r in results[: len(dels)])

    async def _index_members(self, index: str) -> list[str]:
        out: list[str] = []
        offset = 0
        while True:
            ids = await self._submit([("ZRANGE", index, offset, offset + PAGE * 4 - 1)], _first)
            out += [_s(i) for i in ids]
            offset += len(ids)
            if len(ids) < PAGE * 4:
                return out

    async def table_rows(self) -> dict[str, int]:
        k = self.keys
        sessions = await self._index_members(k.sessions_index())
        messages = 0
        for chunk in _chunks(sessions, PAGE):
            messages += sum(
                int(n) for n in await self._submit([("LLEN", k.messages(s)) for s in chunk], _all)
            )
        runs, subs = await self._submit(
            [("ZCOUNT", k.runs_all(), f"({_ms(time.time())}", "+inf"), ("ZCARD", k.subs_all())], _all
        )
        return {"sessions": len(sessions), "messages": messages, "runs": int(runs), "subagents": int(subs)}

    async def store_bytes(self) -> int:
        """The memory Redis reports for this store's records and indexes (MEMORY USAGE)."""
        k = self.keys
        names: list[str] = []
        for key in await self._index_members(k.sessions_index()):
            names += [k.session(key), k.messages(key)]
        names += [k.run(i) for i in await self._index_members(k.runs_all())]
        names += [k.sub(i) for i in await self._index_members(k.subs_all())]
        names += [k.sessions_index(), k.sessions_expiry(), k.runs_all(), k.runs_ended(), k.runs_open()]
        names += [k.subs_all(), k.subs_expiry(), k.subs_live()]
        total = 0
        for chunk in _chunks(names, PAGE):
            total += sum(
                int(n or 0)
                for n in await self._submit([("MEMORY", "USAGE", name, "SAMPLES", 0) for name in chunk], _all)
            )
        return total

    # -- paged reads (runs.list) -------------------------------------------------------------------
    async def page_runs(self, query: RunsPageQuery) -> RunsPage:
        """By expiry deadline, latest first: runs in flight (long deadline), then finished runs,
        most recently written first. The cursor is the rank to continue from."""
        k = self.keys
        index = k.runs_all() if query.session_key is None else k.runs_by_session(query.session_key)
        start = parse_int_cursor(query.cursor) or 0
        ids = [
            _s(i) for i in await self._submit([("ZREVRANGE", index, start, start + query.window - 1)], _first)
        ]
        found: list[RunRecord] = []
        for chunk_start in range(0, len(ids), PAGE):
            chunk = ids[chunk_start : chunk_start + PAGE]
            raws = await self._submit([("MGET", *[k.run(i) for i in chunk])], _first)
            for n, raw in enumerate(raws):
                rec = _decode_run_or_none(raw)
                if rec is not None and query.matches(rec):
                    found.append(rec)
                    if len(found) == query.limit:
                        return RunsPage(found, str(start + chunk_start + n + 1))
        more = len(ids) == query.window
        return RunsPage(found, str(start + len(ids)) if more else None)


# -- helpers ----------------------------------------------------------------------------------------


def _ms(t: float) -> int:
    return int(t * 1000)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _session(key: str, h: Any) -> SessionMeta | None:
    if not h:
        return None
    d = {_s(f): _s(v) for f, v in h.items()}
    if "session_id" not in d or "updated_at" not in d:
        return None  # a partial hash left by a race with delete
    updated_at = float(d["updated_at"])
    return SessionMeta(
        key=key,
        session_id=d["session_id"],
        created_at=float(d.get("created_at", updated_at)),
        updated_at=updated_at,
        kind=d.get("kind", "main"),
        agent_id=d.get("agent_id", "main"),
        label=d.get("label"),
        model=d.get("model"),
        depth=int(d.get("depth", 0)),
        budget_tokens=int(d["budget_tokens"]) if "budget_tokens" in d else None,
        tokens_used=int(d.get("tokens_used", 0)),
    )


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _flat(cmds: Iterable[Cmd]) -> list[str | bytes | int | float]:
    """Commands as script arguments (`_RUN_FLAT`): each one's length, then its words."""
    out: list[str | bytes | int | float] = []
    for cmd in cmds:
        out.append(len(cmd))
        out += cmd
    return out


def _store_error(exc: BaseException) -> BaseException:
    return StoreError(f"redis: {exc}")


def _none(_: list[Any]) -> None:
    return None


def _first(res: list[Any]) -> Any:
    return res[0]


def _all(res: list[Any]) -> list[Any]:
    return res


def _stamps(raw: list[Any]) -> list[tuple[str, float]]:
    """A WITHSCORES reply (pairs, or a flat list on RESP2 without a callback) as stamps."""
    if raw and not isinstance(raw[0], (list, tuple)):
        raw = list(zip(raw[::2], raw[1::2], strict=True))
    return [(_s(m), float(score)) for m, score in raw]


def _decode_run_or_none(raw: bytes | str | None) -> RunRecord | None:
    """A run record, or None for one that expired or cannot be decoded (a page skips both)."""
    if raw is None:
        return None
    try:
        return _run_dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
