"""Daily token aggregates per (agent, model): SQLite rows or Redis hashes that expire.

Bounded on disk by construction: at most `usage_retention_days` days x agents x
(`usage_models_max` + 1) rows (the ledger sums a day's later models as one, automation/usage.py).
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING

from clawgate.store.redis_keys import USAGE, namespace

if TYPE_CHECKING:
    from clawgate.store.redis_store import RedisStore
    from clawgate.store.sqlite import SqliteStore


@dataclass
class UsageRow:
    day: str  # YYYY-MM-DD, UTC
    agent_id: str
    model: str
    input: int
    output: int
    runs: int


class UsageStore(ABC):
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    def add(self, row: UsageRow) -> Awaitable[None]:
        """Queue the row's counts into the store's next write, when called (not when
        awaited): a read issued after this call sees them. Awaiting waits until stored."""

    @abstractmethod
    async def rows(self, since_day: str, until_day: str) -> list[UsageRow]:
        """Rows of the days from `since_day` to `until_day` (inclusive, YYYY-MM-DD)."""

    @abstractmethod
    async def sweep(self, before_day: str) -> int: ...


class SqliteUsageStore(UsageStore):
    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    async def open(self) -> None:
        await self.store.call(
            lambda c: c.execute(
                "CREATE TABLE IF NOT EXISTS usage_daily (day TEXT NOT NULL, agent_id TEXT NOT NULL, "
                "model TEXT NOT NULL, input INTEGER NOT NULL, output INTEGER NOT NULL, runs INTEGER NOT NULL, "
                "PRIMARY KEY (day, agent_id, model))"
            )
        )

    def add(self, row: UsageRow) -> Awaitable[None]:
        values = (row.day, row.agent_id, row.model, row.input, row.output, row.runs)

        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO usage_daily VALUES (?,?,?,?,?,?) ON CONFLICT(day, agent_id, model) DO UPDATE SET "
                "input=input+excluded.input, output=output+excluded.output, runs=runs+excluded.runs",
                values,
            )

        return self.store.call(op)

    async def rows(self, since_day: str, until_day: str) -> list[UsageRow]:
        def read(c: sqlite3.Connection) -> list[UsageRow]:
            cur = c.execute(
                "SELECT day, agent_id, model, input, output, runs FROM usage_daily WHERE day >= ? AND day <= ?",
                (since_day, until_day),
            )
            return [UsageRow(*r) for r in cur.fetchall()]

        return await self.store.call(read)

    async def sweep(self, before_day: str) -> int:
        return await self.store.call(
            lambda c: c.execute("DELETE FROM usage_daily WHERE day < ?", (before_day,)).rowcount
        )


_ADD = """
redis.call('HINCRBY', KEYS[1], ARGV[1] .. 'input', ARGV[2])
redis.call('HINCRBY', KEYS[1], ARGV[1] .. 'output', ARGV[3])
redis.call('HINCRBY', KEYS[1], ARGV[1] .. 'runs', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
"""


class RedisUsageStore(UsageStore):
    """`{p}:usage:{day}` hash, fields `agent\\tmodel\\t{input|output|runs}`, expiring after the retention."""

    def __init__(self, store: RedisStore, *, retention_days: int) -> None:
        self.store = store
        self.p = namespace(store.prefix, USAGE)
        self.ttl_s = (retention_days + 1) * 86400
        self.retention_days = retention_days

    async def open(self) -> None:
        return None

    def add(self, row: UsageRow) -> Awaitable[None]:
        key = f"{self.p}:{row.day}"
        base = f"{row.agent_id}\t{row.model}\t"
        # One script (the three counts and the expiry together), sent with the store's
        # next pipeline.
        return self.store.send(
            [("EVAL", _ADD, 1, key, base, row.input, row.output, row.runs, int(self.ttl_s))]
        )

    async def rows(self, since_day: str, until_day: str) -> list[UsageRow]:
        start, end = date.fromisoformat(since_day), date.fromisoformat(until_day)
        days = [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]
        out: dict[tuple[str, str, str], UsageRow] = {}
        async with self.store.client.pipeline(transaction=False) as pipe:
            for d in days:
                pipe.hgetall(f"{self.p}:{d}")
            hashes = await pipe.execute()
        for d, fields in zip(days, hashes, strict=True):
            for raw_field, raw_value in fields.items():
                agent, model, kind = raw_field.decode().split("\t")
                row = out.setdefault((d, agent, model), UsageRow(d, agent, model, 0, 0, 0))
                setattr(row, kind, int(raw_value))
        return list(out.values())

    async def sweep(self, before_day: str) -> int:
        return 0  # each day's hash expires by itself
