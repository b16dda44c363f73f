"""Where cron jobs and their run history live: SQLite tables or Redis keys.

The one operation that needs care is `claim`: firing an occurrence moves the job's
`nextRunAtMs` from the occurrence to the next one *only if it still is the occurrence*
(compare-and-set). Whichever process wins fires it; on Redis that is exactly one process.
History is bounded twice: at most `history_max` entries per job, and `sweep_runs` drops
entries older than the retention.
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import msgspec

from clawgate.store.cron_records import CronJob, CronRunEntry, entry_decoder, job_decoder, job_encoder
from clawgate.store.redis_keys import CRON, namespace

if TYPE_CHECKING:  # the Redis client is imported only when the store is Redis
    from clawgate.store.redis_store import RedisStore
    from clawgate.store.sqlite import SqliteStore

NEVER = 2**62  # the due-index score of a disabled or finished job


class CronStore(ABC):
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def put_job(self, job: CronJob) -> None: ...

    @abstractmethod
    async def get_job(self, job_id: str) -> CronJob | None: ...

    @abstractmethod
    async def list_jobs(self, limit: int) -> list[CronJob]: ...

    @abstractmethod
    async def delete_job(self, job_id: str) -> bool: ...

    @abstractmethod
    async def due_jobs(self, now_ms: int, limit: int) -> list[CronJob]: ...

    @abstractmethod
    async def next_due_ms(self) -> int | None: ...

    @abstractmethod
    async def claim(self, job: CronJob, expected_ms: int, new_state_job: CronJob) -> bool:
        """Write `new_state_job` if the stored job's nextRunAtMs is still `expected_ms`."""

    @abstractmethod
    async def add_run(self, entry: CronRunEntry, history_max: int) -> None: ...

    @abstractmethod
    async def list_runs(self, job_id: str, limit: int) -> list[CronRunEntry]: ...

    @abstractmethod
    async def sweep_runs(self, before_ms: int) -> int: ...


def due_score(job: CronJob) -> int:
    nxt = job.state.next_run_at_ms
    return nxt if job.enabled and nxt is not None else NEVER


_SCHEMA = """
CREATE TABLE IF NOT EXISTS cron_jobs (id TEXT PRIMARY KEY, due INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS cron_jobs_due ON cron_jobs(due);
CREATE TABLE IF NOT EXISTS cron_runs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, run_id TEXT NOT NULL,
  started_at INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS cron_runs_job ON cron_runs(job_id, seq);
CREATE INDEX IF NOT EXISTS cron_runs_started ON cron_runs(started_at);
"""


class SqliteCronStore(CronStore):
    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    async def open(self) -> None:
        def create(c: sqlite3.Connection) -> None:
            # One statement at a time: executescript would commit the writer's transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)

        await self.store.call(create)

    async def put_job(self, job: CronJob) -> None:
        row = (job.id, due_score(job), job_encoder.encode(job))
        await self.store.call(lambda c: c.execute("INSERT OR REPLACE INTO cron_jobs VALUES (?,?,?)", row))

    async def get_job(self, job_id: str) -> CronJob | None:
        row = await self.store.call(
            lambda c: c.execute("SELECT data FROM cron_jobs WHERE id=?", (job_id,)).fetchone()
        )
        return job_decoder.decode(row[0]) if row else None

    async def list_jobs(self, limit: int) -> list[CronJob]:
        rows = await self.store.call(
            lambda c: c.execute("SELECT data FROM cron_jobs ORDER BY id LIMIT ?", (limit,)).fetchall()
        )
        return _decode_jobs(r[0] for r in rows)

    async def delete_job(self, job_id: str) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            gone = c.execute("DELETE FROM cron_jobs WHERE id=?", (job_id,)).rowcount > 0
            c.execute("DELETE FROM cron_runs WHERE job_id=?", (job_id,))
            return gone

        return await self.store.call(run)

    async def due_jobs(self, now_ms: int, limit: int) -> list[CronJob]:
        rows = await self.store.call(
            lambda c: c.execute(
                "SELECT data FROM cron_jobs WHERE due <= ? ORDER BY due LIMIT ?", (now_ms, limit)
            ).fetchall()
        )
        return _decode_jobs(r[0] for r in rows)

    async def next_due_ms(self) -> int | None:
        row = await self.store.call(lambda c: c.execute("SELECT min(due) FROM cron_jobs").fetchone())
        return int(row[0]) if row and row[0] is not None and row[0] < NEVER else None

    async def claim(self, job: CronJob, expected_ms: int, new_state_job: CronJob) -> bool:
        row = (due_score(new_state_job), job_encoder.encode(new_state_job), job.id, expected_ms)
        return await self.store.call(
            lambda c: c.execute("UPDATE cron_jobs SET due=?, data=? WHERE id=? AND due=?", row).rowcount == 1
        )

    async def add_run(self, entry: CronRunEntry, history_max: int) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO cron_runs (job_id, run_id, started_at, data) VALUES (?,?,?,?)",
                (entry.job_id, entry.run_id, entry.started_at_ms, job_encoder.encode(entry)),
            )
            c.execute(
                "DELETE FROM cron_runs WHERE job_id=? AND seq NOT IN "
                "(SELECT seq FROM cron_runs WHERE job_id=? ORDER BY seq DESC LIMIT ?)",
                (entry.job_id, entry.job_id, history_max),
            )

        await self.store.call(run)

    async def list_runs(self, job_id: str, limit: int) -> list[CronRunEntry]:
        rows = await self.store.call(
            lambda c: c.execute(
                "SELECT data FROM cron_runs WHERE job_id=? ORDER BY seq DESC LIMIT ?", (job_id, limit)
            ).fetchall()
        )
        return [entry_decoder.decode(r[0]) for r in rows]

    async def sweep_runs(self, before_ms: int) -> int:
        return await self.store.call(
            lambda c: c.execute("DELETE FROM cron_runs WHERE started_at < ?", (before_ms,)).rowcount
        )


# Compare-and-set of a job's next occurrence: only the process that still sees the occurrence
# it is firing moves the job on.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score == false or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisCronStore(CronStore):
    """Keys (every one expires; jobs are refreshed on every write):
    `{p}:cron:due` zset id -> next run (ms), `{p}:cron:job:{id}` the job,
    `{p}:cron:runs:{id}` its history (a capped list)."""

    def __init__(self, store: RedisStore, *, job_ttl_s: int, history_ttl_s: int) -> None:
        self.store = store
        self.p = namespace(store.prefix, CRON)
        self.job_ttl_s = job_ttl_s
        self.history_ttl_s = history_ttl_s

    async def open(self) -> None:
        return None

    def _job_key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    async def put_job(self, job: CronJob) -> None:
        r = self.store.client
        async with r.pipeline(transaction=True) as pipe:
            pipe.set(self._job_key(job.id), job_encoder.encode(job), ex=self.job_ttl_s)
            pipe.zadd(f"{self.p}:due", {job.id: due_score(job)})
            pipe.expire(f"{self.p}:due", self.job_ttl_s)
            await pipe.execute()

    async def get_job(self, job_id: str) -> CronJob | None:
        raw = await self.store.client.get(self._job_key(job_id))
        return job_decoder.decode(raw) if raw else None

    async def _jobs(self, ids: list[Any]) -> list[CronJob]:
        if not ids:
            return []
        raws = await self.store.client.mget(
            [self._job_key(i.decode() if isinstance(i, bytes) else i) for i in ids]
        )
        return _decode_jobs(r for r in raws if r)

    async def list_jobs(self, limit: int) -> list[CronJob]:
        ids = await self.store.client.zrange(f"{self.p}:due", 0, limit - 1)
        return sorted(await self._jobs(ids), key=lambda j: j.id)

    async def delete_job(self, job_id: str) -> bool:
        r = self.store.client
        async with r.pipeline(transaction=True) as pipe:
            pipe.zrem(f"{self.p}:due", job_id)
            pipe.delete(self._job_key(job_id), f"{self.p}:runs:{job_id}")
            removed, _ = await pipe.execute()
        return bool(removed)

    async def due_jobs(self, now_ms: int, limit: int) -> list[CronJob]:
        ids = await self.store.client.zrangebyscore(f"{self.p}:due", 0, now_ms, start=0, num=limit)
        return await self._jobs(ids)

    async def next_due_ms(self) -> int | None:
        first = await self.store.client.zrange(f"{self.p}:due", 0, 0, withscores=True)
        score = float(first[0][1]) if first else float(NEVER)
        return None if score >= NEVER else int(score)

    async def claim(self, job: CronJob, expected_ms: int, new_state_job: CronJob) -> bool:
        won = await self.store.client.eval(  # type: ignore[misc]
            _CLAIM,
            2,
            f"{self.p}:due",
            self._job_key(job.id),
            job.id,
            expected_ms,
            due_score(new_state_job),
            job_encoder.encode(new_state_job),
            self.job_ttl_s,
        )
        return bool(won)

    async def add_run(self, entry: CronRunEntry, history_max: int) -> None:
        key = f"{self.p}:runs:{entry.job_id}"
        async with self.store.client.pipeline(transaction=True) as pipe:
            pipe.lpush(key, job_encoder.encode(entry))
            pipe.ltrim(key, 0, history_max - 1)
            pipe.expire(key, self.history_ttl_s)
            await pipe.execute()

    async def list_runs(self, job_id: str, limit: int) -> list[CronRunEntry]:
        raws = await self.store.client.lrange(f"{self.p}:runs:{job_id}", 0, limit - 1)
        return [entry_decoder.decode(r) for r in raws]

    async def sweep_runs(self, before_ms: int) -> int:
        return 0  # each history list expires `history_ttl_s` after its last entry (native TTL)


def _decode_jobs(raws: Any) -> list[CronJob]:
    out = []
    for raw in raws:
        try:
            out.append(job_decoder.decode(raw))
        except msgspec.DecodeError:
            continue  # an undecodable row never blocks the others
    return out
