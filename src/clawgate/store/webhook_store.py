"""The webhook outbox: one row per run-end delivery, in SQLite or Redis.

A delivery is written in the same transaction as the run's end record (`finish_run`), so a
run that ended durably always has its webhook, and one that did not has none. Rows leave
the outbox by construction: a delivered row is deleted at once, a pending one becomes a
dead letter within `webhook_retry_max_s`, and a dead letter is swept `webhook_dead_ttl_s`
after it died (Redis: native expiry as a backstop).
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from clawgate.store.base import Fence
from clawgate.store.records import RunRecord
from clawgate.store.redis_keys import WEBHOOKS, namespace

if TYPE_CHECKING:
    from clawgate.store.redis_store import RedisStore
    from clawgate.store.sqlite import SqliteStore

DeliveryState = Literal["pending", "dead"]


class WebhookDelivery(msgspec.Struct, kw_only=True):
    id: str  # the `webhook-id` header: fixed when the run ends, the same on every attempt
    run_id: str
    url: str
    body: str  # the JSON body, exactly as signed and sent
    created_at: float
    state: DeliveryState = "pending"
    attempts: int = 0
    next_at: float = 0.0
    dead_at: float | None = None
    last_error: str | None = None
    last_status: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "runId": self.run_id,
            "url": self.url,
            "state": self.state,
            "attempts": self.attempts,
            "createdAt": int(self.created_at * 1000),
            "nextAttemptAt": int(self.next_at * 1000) if self.state == "pending" else None,
            "deadAt": int(self.dead_at * 1000) if self.dead_at is not None else None,
            "lastError": self.last_error,
            "lastStatus": self.last_status,
        }


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(WebhookDelivery)


def _decode(raw: bytes | str) -> WebhookDelivery | None:
    try:
        return _dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # an undecodable row never blocks the others


class WebhookStore(ABC):
    # Other processes add deliveries too (Redis): the worker must look now and then, not only
    # when this process wakes it.
    shared: bool = False

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def finish_run(
        self, rec: RunRecord, delivery: WebhookDelivery, fence: Fence | None = None
    ) -> RunRecord | None:
        """Write the run's end record and enqueue its delivery, atomically; fenced and
        first-end-wins like `Store.end_run`, whose answer it returns (the delivery is written
        only with the end it belongs to)."""

    @abstractmethod
    async def due(self, now: float, limit: int) -> list[WebhookDelivery]:
        """Pending deliveries whose next attempt is due, earliest first."""

    @abstractmethod
    async def next_due_at(self) -> float | None: ...

    @abstractmethod
    async def get(self, delivery_id: str) -> WebhookDelivery | None: ...

    @abstractmethod
    async def update(self, d: WebhookDelivery) -> None:
        """Replace a delivery (after a failed attempt, a dead letter, a retry) if it still exists."""

    @abstractmethod
    async def delete(self, delivery_id: str) -> None: ...

    @abstractmethod
    async def list(self, state: DeliveryState | None, limit: int) -> list[WebhookDelivery]: ...

    @abstractmethod
    async def counts(self) -> dict[str, int]:
        """{"pending": n, "dead": n}."""

    @abstractmethod
    async def sweep_dead(self, before: float) -> int:
        """Delete dead letters that died before `before`."""

    async def claim(self, delivery_id: str, owner: str, ttl_s: float) -> bool:
        """Take the right to attempt a delivery now. One process per SQLite file: always yes."""
        return True

    async def release(self, delivery_id: str, owner: str) -> None:
        return None


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS webhook_outbox (id TEXT PRIMARY KEY, run_id TEXT NOT NULL, "
    "state TEXT NOT NULL, next_at REAL NOT NULL, dead_at REAL, data BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox(state, next_at)",
    "CREATE INDEX IF NOT EXISTS webhook_outbox_dead ON webhook_outbox(dead_at) WHERE dead_at IS NOT NULL",
)


def _row(d: WebhookDelivery) -> tuple[Any, ...]:
    return (d.id, d.run_id, d.state, d.next_at, d.dead_at, _enc.encode(d))


class SqliteWebhookStore(WebhookStore):
    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    async def open(self) -> None:
        def op(c: sqlite3.Connection) -> None:
            for sql in _SCHEMA:
                c.execute(sql)

        await self.store.call(op)

    async def finish_run(
        self, rec: RunRecord, delivery: WebhookDelivery, fence: Fence | None = None
    ) -> RunRecord | None:
        # One process owns a SQLite store: no competing end, no lease to check.
        await self.store.finish_run(
            rec,
            # OR IGNORE: a second end of the same run (it cannot happen, but a restore racing a
            # late end must not mint a second webhook-id) keeps the first delivery.
            lambda c: c.execute("INSERT OR IGNORE INTO webhook_outbox VALUES (?,?,?,?,?,?)", _row(delivery)),
        )
        return rec

    async def due(self, now: float, limit: int) -> list[WebhookDelivery]:
        rows = await self.store.call(
            lambda c: c.execute(
                "SELECT data FROM webhook_outbox WHERE state='pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [d for d in (_decode(r[0]) for r in rows) if d is not None]

    async def next_due_at(self) -> float | None:
        row = await self.store.call(
            lambda c: c.execute("SELECT min(next_at) FROM webhook_outbox WHERE state='pending'").fetchone()
        )
        return float(row[0]) if row and row[0] is not None else None

    async def get(self, delivery_id: str) -> WebhookDelivery | None:
        row = await self.store.call(
            lambda c: c.execute("SELECT data FROM webhook_outbox WHERE id=?", (delivery_id,)).fetchone()
        )
        return _decode(row[0]) if row else None

    async def update(self, d: WebhookDelivery) -> None:
        _id, _run, state, next_at, dead_at, data = _row(d)
        await self.store.call(
            lambda c: c.execute(
                "UPDATE webhook_outbox SET state=?, next_at=?, dead_at=?, data=? WHERE id=?",
                (state, next_at, dead_at, data, d.id),
            )
        )

    async def delete(self, delivery_id: str) -> None:
        await self.store.call(lambda c: c.execute("DELETE FROM webhook_outbox WHERE id=?", (delivery_id,)))

    async def list(self, state: DeliveryState | None, limit: int) -> list[WebhookDelivery]:
        if state is None:
            sql, args = "SELECT data FROM webhook_outbox ORDER BY rowid DESC LIMIT ?", (limit,)
        else:
            sql = "SELECT data FROM webhook_outbox WHERE state=? ORDER BY rowid DESC LIMIT ?"
            args = (state, limit)  # type: ignore[assignment]
        rows = await self.store.call(lambda c: c.execute(sql, args).fetchall())
        return [d for d in (_decode(r[0]) for r in rows) if d is not None]

    async def counts(self) -> dict[str, int]:
        rows = await self.store.call(
            lambda c: c.execute("SELECT state, count(*) FROM webhook_outbox GROUP BY state").fetchall()
        )
        out = {"pending": 0, "dead": 0}
        out.update({str(r[0]): int(r[1]) for r in rows})
        return out

    async def sweep_dead(self, before: float) -> int:
        return int(
            await self.store.call(
                lambda c: (
                    c.execute(
                        "DELETE FROM webhook_outbox WHERE state='dead' AND dead_at <= ?", (before,)
                    ).rowcount
                )
            )
        )


class RedisWebhookStore(WebhookStore):
    """Keys (P is the store prefix):

    P:wh:d:{id}      STRING delivery JSON; expires retry window + dead TTL after its last write
    P:wh:due         ZSET   id -> next attempt (pending deliveries)
    P:wh:dead        ZSET   id -> dead_at (dead letters)
    P:wh:claim:{id}  STRING the process attempting it now; SET NX PX (one process delivers)
    """

    shared = True

    def __init__(self, store: RedisStore, *, record_ttl_s: float) -> None:
        self.store = store
        self.p = namespace(store.prefix, WEBHOOKS)
        self.ttl_ms = int(record_ttl_s * 1000)

    def _key(self, delivery_id: str) -> str:
        return f"{self.p}:d:{delivery_id}"

    def _cmds(self, d: WebhookDelivery) -> list[tuple[str | int | float | bytes, ...]]:
        zin, zout = (
            (f"{self.p}:due", f"{self.p}:dead")
            if d.state == "pending"
            else (f"{self.p}:dead", f"{self.p}:due")
        )
        score = d.next_at if d.state == "pending" else (d.dead_at or 0.0)
        return [
            ("SET", self._key(d.id), _enc.encode(d).decode(), "PX", self.ttl_ms),
            ("ZADD", zin, repr(score), d.id),
            ("ZREM", zout, d.id),
        ]

    async def open(self) -> None:
        return None

    async def finish_run(
        self, rec: RunRecord, delivery: WebhookDelivery, fence: Fence | None = None
    ) -> RunRecord | None:
        # The run's end script runs the delivery's commands too: the fence and first-end checks
        # cover both, so a writer that lost the lease enqueues nothing.
        return await self.store.end_run(rec, fence, extra=self._cmds(delivery))

    async def due(self, now: float, limit: int) -> list[WebhookDelivery]:
        ids = await self.store.client.zrangebyscore(f"{self.p}:due", "-inf", now, start=0, num=limit)
        return await self._many(ids, f"{self.p}:due")

    async def _many(self, ids: list[Any], index: str) -> list[WebhookDelivery]:
        if not ids:
            return []
        raws = await self.store.client.mget(
            [self._key(i.decode() if isinstance(i, bytes) else i) for i in ids]
        )
        out, gone = [], []
        for i, raw in zip(ids, raws, strict=True):
            d = _decode(raw) if raw is not None else None
            if d is None:
                gone.append(i)
            else:
                out.append(d)
        if gone:  # index entries of records that expired or did not decode
            await self.store.client.zrem(index, *gone)
        return out

    async def next_due_at(self) -> float | None:
        first = await self.store.client.zrange(f"{self.p}:due", 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def get(self, delivery_id: str) -> WebhookDelivery | None:
        raw = await self.store.client.get(self._key(delivery_id))
        return _decode(raw) if raw is not None else None

    async def update(self, d: WebhookDelivery) -> None:
        if not await self.store.client.exists(self._key(d.id)):
            return
        async with self.store.client.pipeline(transaction=True) as pipe:
            for cmd in self._cmds(d):
                pipe.execute_command(*cmd)
            await pipe.execute()

    async def delete(self, delivery_id: str) -> None:
        async with self.store.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(delivery_id))
            pipe.zrem(f"{self.p}:due", delivery_id)
            pipe.zrem(f"{self.p}:dead", delivery_id)
            await pipe.execute()

    async def list(self, state: DeliveryState | None, limit: int) -> list[WebhookDelivery]:
        out: list[WebhookDelivery] = []
        for st in ("pending", "dead") if state is None else (state,):
            index = f"{self.p}:due" if st == "pending" else f"{self.p}:dead"
            ids = await self.store.client.zrevrange(index, 0, limit - 1)
            out += await self._many(ids, index)
        return out[:limit]

    async def counts(self) -> dict[str, int]:
        async with self.store.client.pipeline(transaction=False) as pipe:
            pipe.zcard(f"{self.p}:due")
            pipe.zcard(f"{self.p}:dead")
            pending, dead = await pipe.execute()
        return {"pending": int(pending), "dead": int(dead)}

    async def sweep_dead(self, before: float) -> int:
        ids = await self.store.client.zrangebyscore(f"{self.p}:dead", "-inf", before, start=0, num=500)
        if not ids:
            return 0
        async with self.store.client.pipeline(transaction=True) as pipe:
            pipe.zrem(f"{self.p}:dead", *ids)
            for i in ids:
                pipe.delete(self._key(_str(i)))
            await pipe.execute()
        return len(ids)

    async def claim(self, delivery_id: str, owner: str, ttl_s: float) -> bool:
        return bool(
            await self.store.client.set(f"{self.p}:claim:{delivery_id}", owner, nx=True, px=int(ttl_s * 1000))
        )

    async def release(self, delivery_id: str, owner: str) -> None:
        key = f"{self.p}:claim:{delivery_id}"
        # Only our own claim: one that expired and was taken by another process stays.
        await self.store.client.eval(  # type: ignore[misc]
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            key,
            owner,
        )


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
