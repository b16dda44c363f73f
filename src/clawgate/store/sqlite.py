"""The embedded SQLite store: one file under the state dir, WAL, one writer thread.

Every statement runs on the writer thread, which drains its queue and groups
what it finds into one transaction (group commit), so 1,000 runs/s cost a few
hundred commits/s, not thousands, and nothing blocks the event loop. Reads go
through the same thread, after the writes enqueued before them, so a client
reads what it was told was done.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog

from clawgate.errors import StoreError
from clawgate.store.base import Store
from clawgate.store.base import log_write_failure as _consume
from clawgate.store.base import settle_exception as _set_exception
from clawgate.store.base import settle_result as _set_result
from clawgate.store.records import RunRecord, SessionMeta, SubagentRecord, TranscriptMessage

log = structlog.get_logger("clawgate.store.sqlite")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  key TEXT PRIMARY KEY, session_id TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
  kind TEXT NOT NULL, agent_id TEXT NOT NULL, label TEXT, model TEXT);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions(updated_at);
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT, session_key TEXT NOT NULL, role TEXT NOT NULL,
  content TEXT NOT NULL, ts REAL NOT NULL, run_id TEXT);
CREATE INDEX IF NOT EXISTS messages_session ON messages(session_key, id);
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, session_key TEXT NOT NULL, status TEXT NOT NULL, ended_at REAL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS runs_open ON runs(status) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS runs_ended ON runs(ended_at);
CREATE INDEX IF NOT EXISTS runs_session ON runs(session_key);
CREATE TABLE IF NOT EXISTS idem (key TEXT PRIMARY KEY, run_id TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS subagents (
  run_id TEXT PRIMARY KEY, requester TEXT NOT NULL, live INTEGER NOT NULL, expires_at REAL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS subagents_expiry ON subagents(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS subagents_live ON subagents(live) WHERE live = 1;
CREATE INDEX IF NOT EXISTS subagents_requester ON subagents(requester);
"""

_run_enc = msgspec.json.Encoder()
_run_dec = msgspec.json.Decoder(RunRecord)
_sub_dec = msgspec.json.Decoder(SubagentRecord)

_Op = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any] | None, asyncio.AbstractEventLoop | None]


class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, path: Path, *, batch_max: int = 512, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.batch_max = batch_max
        self.synchronous = synchronous
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.commits = 0
        self.ops = 0

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name="clawgate-sqlite-writer", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._closed or self._thread is None:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    async def ping(self) -> bool:
        if self._closed or self._thread is None or not self._thread.is_alive():
            return False
        try:
            await asyncio.wait_for(self._submit(lambda c: c.execute("SELECT 1").fetchone()), 5)
        except (TimeoutError, StoreError):
            return False
        return True

    def barrier(self) -> Awaitable[None]:
        return self._submit(lambda c: None)

    # -- the writer thread -----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        return conn

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            conn = self._connect()
        except Exception as exc:
            loop.call_soon_threadsafe(_set_exception, ready, StoreError(f"cannot open {self.path}: {exc}"))
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                results = self._execute(conn, batch)
            except Exception as exc:  # a bug here must not kill the only writer: fail the batch
                log.exception("sqlite writer failed a batch")
                results = [(False, StoreError(f"sqlite writer: {type(exc).__name__}: {exc}"))] * len(batch)
            self._deliver(batch, results)
        conn.close()

    def _execute(self, conn: sqlite3.Connection, batch: list[_Op]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, fn(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    # Any failure of one op (SQL error, undecodable row, a bug in the op) fails
                    # that op alone; raising here would end the writer thread and every later
                    # store call would wait forever.
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, StoreError(f"sqlite: {type(exc).__name__}: {exc}")))
            conn.execute("COMMIT")
            self.commits += 1
            self.ops += len(batch)
        except sqlite3.Error as exc:
            log.error("sqlite transaction failed", error=str(exc))
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(False, StoreError(f"sqlite: {exc}")) for _ in batch]
        return results

    @staticmethod
    def _deliver(batch: list[_Op], results: list[tuple[bool, Any]]) -> None:
        # One wake-up of each waiting loop per transaction, not one per op: waking the loop
        # costs a syscall, and a full batch is hundreds of ops.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, fut, loop), (ok, value) in zip(batch, results, strict=True):
            if fut is not None and loop is not None:
                by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, items)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._closed:
            fut.set_exception(StoreError("store is closed"))
            return fut
        self._queue.put((fn, fut, loop))
        return fut

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> asyncio.Future[None]:
        fut = self._submit(fn)
        # Writes nobody awaits must not log "exception never retrieved".
        fut.add_done_callback(_consume)
        return fut

    # -- sessions ----------------------------------------------------------------------------
    def put_session(self, meta: SessionMeta) -> Awaitable[None]:
        row = (
            meta.key,
            meta.session_id,
            meta.created_at,
            meta.updated_at,
            meta.kind,
            meta.agent_id,
            meta.label,
            meta.model,
        )
        return self._write(
            lambda c: c.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
                "session_id=excluded.session_id, updated_at=excluded.updated_at, kind=excluded.kind, "
                "agent_id=excluded.agent_id, label=excluded.label, model=excluded.model",
                row,
            )
        )

    async def get_session(self, key: str) -> SessionMeta | None:
        row = await self._submit(lambda c: c.execute("SELECT * FROM sessions WHERE key=?", (key,)).fetchone())
        return _session(row) if row else None

    async def list_sessions(
        self, *, limit: int, updated_since: float | None = None, prefix: str | None = None
    ) -> list[SessionMeta]:
        sql = "SELECT * FROM sessions WHERE 1=1"
        args: list[Any] = []
        if updated_since is not None:
            sql += " AND updated_at >= ?"
            args.append(updated_since)
        if prefix:
            sql += " AND substr(key, 1, ?) = ?"
            args += [len(prefix), prefix]
        sql += " ORDER BY updated_at DESC LIMIT ?"
        args.append(limit)
        rows = await self._submit(lambda c: c.execute(sql, args).fetchall())
        return [_session(r) for r in rows]

    def delete_session(self, key: str) -> Awaitable[None]:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM sessions WHERE key=?", (key,))
            c.execute("DELETE FROM messages WHERE session_key=?", (key,))

        return self._write(op)

    def reset_session(self, key: str, new_session_id: str, now: float) -> Awaitable[None]:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM messages WHERE session_key=?", (key,))
            c.execute(
                "UPDATE sessions SET session_id=?, updated_at=? WHERE key=?", (new_session_id, now, key)
            )

        return self._write(op)

    # -- transcripts ---------------------------------------------------------------------------
    def append_message(self, msg: TranscriptMessage) -> Awaitable[None]:
        row = (msg.session_key, msg.role, msg.content, msg.ts, msg.run_id)
        return self._write(
            lambda c: c.execute(
                "INSERT INTO messages(session_key, role, content, ts, run_id) VALUES (?,?,?,?,?)", row
            )
        )

    async def history(self, session_key: str, limit: int) -> list[TranscriptMessage]:
        rows = await self._submit(
            lambda c: c.execute(
                "SELECT session_key, role, content, ts, run_id FROM messages WHERE session_key=? "
                "ORDER BY id DESC LIMIT ?",
                (session_key, limit),
            ).fetchall()
        )
        return [
            TranscriptMessage(session_key=r[0], role=r[1], content=r[2], ts=r[3], run_id=r[4])
            for r in reversed(rows)
        ]

    async def history_before(
        self, session_key: str, before: int | None, limit: int, clip_chars: int
    ) -> list[tuple[int, TranscriptMessage]]:
        # Positions are row ids: stable while the transcript grows, so pages never overlap.
        # `substr` keeps a huge message from being read whole (SQLite counts characters).
        rows = await self._submit(
            lambda c: c.execute(
                "SELECT id, session_key, role, substr(content, 1, ?), ts, run_id FROM messages "
                "WHERE session_key=? AND id < ? ORDER BY id DESC LIMIT ?",
                (clip_chars + 1, session_key, before if before is not None else 2**63 - 1, limit),
            ).fetchall()
        )
        return [
            (r[0], TranscriptMessage(session_key=r[1], role=r[2], content=r[3], ts=r[4], run_id=r[5]))
            for r in rows
        ]

    # -- runs ---------------------------------------------------------------------------------------
    def put_run(self, rec: RunRecord) -> Awaitable[None]:
        row = (rec.run_id, rec.session_key, rec.status, rec.ended_at, _run_enc.encode(rec))
        return self._write(
            lambda c: c.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET "
                "status=excluded.status, ended_at=excluded.ended_at, data=excluded.data",
                row,
            )
        )

    async def create_run(self, rec: RunRecord, *, reuse_after_s: float, now: float) -> RunRecord | None:
        row = (rec.run_id, rec.session_key, rec.status, rec.ended_at, _run_enc.encode(rec))

        def op(c: sqlite3.Connection) -> RunRecord | None:
            found = c.execute("SELECT data FROM runs WHERE run_id=?", (rec.run_id,)).fetchone()
            existing = _decode_run(found[0]) if found is not None else None
            # An undecodable row is no run to join: it is replaced.
            if existing is not None and (not existing.is_final or existing.accepted_at + reuse_after_s > now):
                return existing
            c.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?)", row)
            return None

        return await self._submit(op)

    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self._submit(
            lambda c: c.execute("SELECT data FROM runs WHERE run_id=?", (run_id,)).fetchone()
        )
        return _decode_run(row[0]) if row else None

    async def unfinished_runs(self) -> list[RunRecord]:
        rows = await self._submit(
            lambda c: c.execute("SELECT data FROM runs WHERE status IN ('queued', 'running')").fetchall()
        )
        # One corrupt row must not keep the gateway from starting: it is logged and skipped.
        decoded = (_decode_run(r[0]) for r in rows)
        return [rec for rec in decoded if rec is not None]

    async def count_runs(self, session_key: str | None = None) -> int:
        if session_key is None:
            row = await self._submit(lambda c: c.execute("SELECT count(*) FROM runs").fetchone())
        else:
            row = await self._submit(
                lambda c: c.execute(
                    "SELECT count(*) FROM runs WHERE session_key=?", (session_key,)
                ).fetchone()
            )
        return int(row[0])

    async def sweep_runs(self, before: float) -> int:
        def op(c: sqlite3.Connection) -> int:
            c.execute("DELETE FROM idem WHERE expires_at <= ?", (before,))
            return c.execute(
                "DELETE FROM runs WHERE ended_at IS NOT NULL AND ended_at <= ?", (before,)
            ).rowcount

        return int(await self._submit(op))

    # -- idempotency --------------------------------------------------------------------------------
    async def claim_key(self, key: str, run_id: str, ttl_s: float, now: float) -> str | None:
        def op(c: sqlite3.Connection) -> str | None:
            row = c.execute("SELECT run_id, expires_at FROM idem WHERE key=?", (key,)).fetchone()
            if row is not None and row[1] > now:
                return str(row[0])
            c.execute("INSERT OR REPLACE INTO idem VALUES (?,?,?)", (key, run_id, now + ttl_s))
            return None

        return await self._submit(op)

    # -- subagents ----------------------------------------------------------------------------------
    def put_subagent(self, rec: SubagentRecord) -> Awaitable[None]:
        live = int(rec.cleanup_completed_at is None or not rec.ended_notified)
        row = (rec.run_id, rec.requester_session_key, live, rec.expires_at, _run_enc.encode(rec))
        return self._write(
            lambda c: c.execute(
                "INSERT INTO subagents VALUES (?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET "
                "live=excluded.live, expires_at=excluded.expires_at, data=excluded.data",
                row,
            )
        )

    async def get_subagent(self, run_id: str) -> SubagentRecord | None:
        row = await self._submit(
            lambda c: c.execute("SELECT data FROM subagents WHERE run_id=?", (run_id,)).fetchone()
        )
        return _sub_dec.decode(row[0]) if row else None

    async def list_subagents(self, requester: str | None, limit: int) -> list[SubagentRecord]:
        if requester is None:
            rows = await self._submit(
                lambda c: c.execute(
                    "SELECT data FROM subagents ORDER BY rowid DESC LIMIT ?", (limit,)
                ).fetchall()
            )
        else:
            rows = await self._submit(
                lambda c: c.execute(
                    "SELECT data FROM subagents WHERE requester=? ORDER BY rowid DESC LIMIT ?",
                    (requester, limit),
                ).fetchall()
            )
        return [_sub_dec.decode(r[0]) for r in rows]

    async def live_subagents(self) -> list[SubagentRecord]:
        rows = await self._submit(lambda c: c.execute("SELECT data FROM subagents WHERE live=1").fetchall())
        return [_sub_dec.decode(r[0]) for r in rows]

    async def due_subagents(self, now: float, limit: int) -> list[SubagentRecord]:
        rows = await self._submit(
            lambda c: c.execute(
                "SELECT data FROM subagents WHERE expires_at IS NOT NULL AND expires_at <= ? "
                "ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [_sub_dec.decode(r[0]) for r in rows]

    def delete_subagent(self, run_id: str) -> Awaitable[None]:
        return self._write(lambda c: c.execute("DELETE FROM subagents WHERE run_id=?", (run_id,)))

    async def count_subagents(self) -> int:
        row = await self._submit(lambda c: c.execute("SELECT count(*) FROM subagents").fetchone())
        return int(row[0])


def _session(row: Any) -> SessionMeta:
    return SessionMeta(
        key=row[0],
        session_id=row[1],
        created_at=row[2],
        updated_at=row[3],
        kind=row[4],
        agent_id=row[5],
        label=row[6],
        model=row[7],
    )


def _decode_run(data: bytes) -> RunRecord | None:
    try:
        return _run_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("undecodable run record", error=str(exc))
        return None


def _resolve_all(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in items:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
