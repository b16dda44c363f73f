"""The embedded SQLite store: one file under the state dir, WAL, one writer thread.

Every statement runs on the writer thread, which drains its queue and groups
what it finds into one transaction (group commit), so 1,000 runs/s cost a few
hundred commits/s, not thousands, and nothing blocks the event loop. Reads go
through the same thread, after the writes enqueued before them, so a client
reads what it was told was done.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog

from clawgate.errors import StoreError
from clawgate.store.base import SessionGate, SessionStamp, Store
from clawgate.store.base import log_write_failure as _consume
from clawgate.store.base import settle_exception as _set_exception
from clawgate.store.base import settle_result as _set_result
from clawgate.store.records import RunRecord, SessionMeta, SubagentRecord, TranscriptMessage
from clawgate.store.run_pages import RunsPage, RunsPageQuery, parse_int_cursor
from clawgate.store.trim import transcript_keep

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
CREATE TABLE IF NOT EXISTS subagents_quarantine (
  id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, error TEXT NOT NULL, at REAL NOT NULL,
  data BLOB NOT NULL);
"""
QUARANTINE_KEEP = 1000  # undecodable rows kept aside for inspection (newest first)

# Retention bookkeeping (docs/disk.md): how many messages retention dropped from a
# transcript, so `chat.history` can say the history was truncated.
RETENTION_SCHEMA = """
CREATE TABLE IF NOT EXISTS transcript_trims (session_key TEXT PRIMARY KEY, dropped INTEGER NOT NULL);
"""
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated to this after a checkpoint
DELETE_PAGE = 500  # rows per retention statement: the writer interleaves other work between pages
VACUUM_PAGES_PER_OP = 2000  # pages freed per writer op (8 MiB at 4 KiB pages)

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
        # Items are lists of ops: every op submitted during one turn of the event loop goes to
        # the writer as one item (one wake-up of the writer thread, not one per op).
        self._queue: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self._pending: list[_Op] = []
        self._pending_loop: asyncio.AbstractEventLoop | None = None
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
        self._flush()
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
        _prepare_vacuum(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
        if "depth" not in columns:  # files written before the spawn depth was kept with the session
            conn.execute("ALTER TABLE sessions ADD COLUMN depth INTEGER NOT NULL DEFAULT 0")
        if "budget_tokens" not in columns:  # files written before session token budgets
            conn.execute("ALTER TABLE sessions ADD COLUMN budget_tokens INTEGER")
            conn.execute("ALTER TABLE sessions ADD COLUMN tokens_used INTEGER NOT NULL DEFAULT 0")
        conn.executescript(RETENTION_SCHEMA)
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
            batch = list(first)
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.extend(item)
            try:
                results = self._execute(conn, batch)
            except Exception as exc:  # a bug here must not kill the only writer: fail the batch
                log.exception("sqlite writer failed a batch")
                results = [(False, StoreError(f"sqlite writer: {type(exc).__name__}: {exc}"))] * len(batch)
            self._deliver(batch, results)
        conn.close()

    def _execute(self, conn: sqlite3.Connection, batch: list[_Op]) -> list[tuple[bool, Any]]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # The common case: every op succeeds, and the batch costs BEGIN + ops + COMMIT.
                results: list[tuple[bool, Any]] = [(True, fn(conn)) for fn, _, _ in batch]
            except Exception as exc:
                # One op failed (SQL error, undecodable row, a bug in the op). Undo the whole
                # transaction and run the batch again with a savepoint per op, so that op fails
                # alone and its neighbours still commit. Ops are functions of the connection
                # only (they change nothing outside the database), so after the rollback a
                # second run of the ones that had succeeded applies them exactly once.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if len(batch) == 1:
                    return [(False, _op_error(exc))]
                conn.execute("BEGIN IMMEDIATE")
                results = self._execute_each(conn, batch)
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
    def _execute_each(conn: sqlite3.Connection, batch: list[_Op]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        for fn, _, _ in batch:
            conn.execute("SAVEPOINT op")
            try:
                results.append((True, fn(conn)))
                conn.execute("RELEASE op")
            except Exception as exc:
                # Any failure of one op fails that op alone; raising here would end the writer
                # thread and every later store call would wait forever.
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((False, _op_error(exc)))
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
        if self._pending_loop is not loop:
            self._flush()  # another loop's ops (never in one gateway) go first, in order
            self._pending_loop = loop
        pending = self._pending
        pending.append((fn, fut, loop))
        if len(pending) == 1:
            # Handed over at the end of this loop turn: a run's accept, its session writes
            # and its transcript lines, and those of the other runs active in the same turn,
            # cost the writer thread one wake-up. Awaiting callers still wait for the commit.
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        ops, self._pending = self._pending, []
        if ops:
            self._queue.put(ops)

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run `fn` on the writer thread, in its next transaction (optional features' own tables)."""
        return self._submit(fn)

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
            meta.depth,
            meta.budget_tokens,
        )
        # The depth is never lowered and the budget never dropped: a touch that re-creates the
        # metadata from scratch (known_new) does not know them. The tokens used are only ever
        # added to (add_session_tokens), never written from a possibly stale copy.
        return self._write(
            lambda c: c.execute(
                "INSERT INTO sessions(key, session_id, created_at, updated_at, kind, agent_id, label, "
                "model, depth, budget_tokens) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
                "session_id=excluded.session_id, updated_at=excluded.updated_at, kind=excluded.kind, "
                "agent_id=excluded.agent_id, label=excluded.label, model=excluded.model, "
                "depth=max(sessions.depth, excluded.depth), "
                "budget_tokens=coalesce(excluded.budget_tokens, sessions.budget_tokens)",
                row,
            )
        )

    async def get_session(self, key: str) -> SessionMeta | None:
        row = await self._submit(
            lambda c: c.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE key=?", (key,)).fetchone()
        )
        return _session(row) if row else None

    async def list_sessions(
        self, *, limit: int, updated_since: float | None = None, prefix: str | None = None
    ) -> list[SessionMeta]:
        sql = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE 1=1"
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

    def add_session_tokens(self, key: str, tokens: int) -> Awaitable[None]:
        return self._write(
            lambda c: c.execute(
                "UPDATE sessions SET tokens_used = tokens_used + ? WHERE key=?", (tokens, key)
            )
        )

    def delete_session(self, key: str) -> Awaitable[None]:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM sessions WHERE key=?", (key,))
            c.execute("DELETE FROM messages WHERE session_key=?", (key,))
            c.execute("DELETE FROM transcript_trims WHERE session_key=?", (key,))

        return self._write(op)

    def reset_session(self, key: str, new_session_id: str, now: float) -> Awaitable[None]:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM messages WHERE session_key=?", (key,))
            c.execute("DELETE FROM transcript_trims WHERE session_key=?", (key,))
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

    def append_to_existing(self, msg: TranscriptMessage) -> Awaitable[bool]:
        row = (msg.session_key, msg.role, msg.content, msg.ts, msg.run_id)

        def op(c: sqlite3.Connection) -> bool:
            updated = c.execute(
                "UPDATE sessions SET updated_at=max(updated_at, ?) WHERE key=?", (msg.ts, msg.session_key)
            ).rowcount
            if not updated:
                return False
            c.execute("INSERT INTO messages(session_key, role, content, ts, run_id) VALUES (?,?,?,?,?)", row)
            return True

        fut = self._submit(op)
        fut.add_done_callback(_consume)
        return fut

    def history(self, session_key: str, limit: int) -> Awaitable[list[TranscriptMessage]]:
        def op(c: sqlite3.Connection) -> list[TranscriptMessage]:
            rows = c.execute(
                "SELECT session_key, role, content, ts, run_id FROM messages WHERE session_key=? "
                "ORDER BY id DESC LIMIT ?",
                (session_key, limit),
            ).fetchall()
            return [
                TranscriptMessage(session_key=r[0], role=r[1], content=r[2], ts=r[3], run_id=r[4])
                for r in reversed(rows)
            ]

        return self._submit(op)

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
        return self._write(lambda c: c.execute(_PUT_RUN, row))

    def finish_run(self, rec: RunRecord, also: Callable[[sqlite3.Connection], Any]) -> Awaitable[None]:
        """Write a run's end record and `also` (e.g. its webhook delivery) in one transaction:
        both are durable, or neither is."""
        row = (rec.run_id, rec.session_key, rec.status, rec.ended_at, _run_enc.encode(rec))

        def op(c: sqlite3.Connection) -> None:
            c.execute(_PUT_RUN, row)
            also(c)

        return self._write(op)

    async def create_run(
        self, rec: RunRecord, *, reuse_after_s: float, now: float, gate: SessionGate | None = None
    ) -> RunRecord | None:
        row = (rec.run_id, rec.session_key, rec.status, rec.ended_at, _run_enc.encode(rec))

        def op(c: sqlite3.Connection) -> RunRecord | SessionMeta | None:
            found = c.execute("SELECT data FROM runs WHERE run_id=?", (rec.run_id,)).fetchone()
            existing = _decode_run(found[0]) if found is not None else None
            # An undecodable row is no run to join: it is replaced.
            if existing is not None and (not existing.is_final or existing.accepted_at + reuse_after_s > now):
                return existing
            if gate is not None:
                session = c.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE key=?", (rec.session_key,)
                ).fetchone()
                meta = _session(session) if session else None
                if meta is not None and gate.refuses(meta):
                    return meta
            c.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?)", row)
            return None

        out = await self._submit(op)
        if isinstance(out, SessionMeta):
            assert gate is not None
            raise gate.refusal(out)
        return out

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
    @staticmethod
    def _sub_row(rec: SubagentRecord) -> tuple[Any, ...]:
        live = int(rec.cleanup_completed_at is None or not rec.ended_notified)
        return (rec.run_id, rec.requester_session_key, live, rec.expires_at, _run_enc.encode(rec))

    def put_subagent(self, rec: SubagentRecord) -> Awaitable[None]:
        row = self._sub_row(rec)
        return self._write(
            lambda c: c.execute(
                "INSERT INTO subagents VALUES (?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET "
                "live=excluded.live, expires_at=excluded.expires_at, data=excluded.data",
                row,
            )
        )

    def update_subagent(self, rec: SubagentRecord) -> Awaitable[bool]:
        run_id, _, live, expires_at, data = self._sub_row(rec)
        fut = self._submit(
            lambda c: (
                c.execute(
                    "UPDATE subagents SET live=?, expires_at=?, data=? WHERE run_id=?",
                    (live, expires_at, data, run_id),
                ).rowcount
                > 0
            )
        )
        fut.add_done_callback(_consume)
        return fut

    async def _subs(self, sql: str, args: tuple[Any, ...]) -> list[SubagentRecord]:
        """Run a `SELECT run_id, data` query; undecodable rows are moved aside in the same transaction."""
        out, bad = await self._submit(lambda c: _decode_subs(c, c.execute(sql, args).fetchall()))
        self.subagents_quarantined += bad
        return out

    async def get_subagent(self, run_id: str) -> SubagentRecord | None:
        found = await self._subs("SELECT run_id, data FROM subagents WHERE run_id=?", (run_id,))
        return found[0] if found else None

    async def list_subagents(self, requester: str | None, limit: int) -> list[SubagentRecord]:
        if requester is None:
            return await self._subs(
                "SELECT run_id, data FROM subagents ORDER BY rowid DESC LIMIT ?", (limit,)
            )
        return await self._subs(
            "SELECT run_id, data FROM subagents WHERE requester=? ORDER BY rowid DESC LIMIT ?",
            (requester, limit),
        )

    async def live_subagents(self) -> list[SubagentRecord]:
        return await self._subs("SELECT run_id, data FROM subagents WHERE live=1", ())

    async def due_subagents(self, now: float, limit: int) -> list[SubagentRecord]:
        return await self._subs(
            "SELECT run_id, data FROM subagents WHERE expires_at IS NOT NULL AND expires_at <= ? "
            "ORDER BY expires_at LIMIT ?",
            (now, limit),
        )

    def delete_subagent(self, run_id: str) -> Awaitable[None]:
        return self._write(lambda c: c.execute("DELETE FROM subagents WHERE run_id=?", (run_id,)))

    async def count_subagents(self) -> int:
        row = await self._submit(lambda c: c.execute("SELECT count(*) FROM subagents").fetchone())
        return int(row[0])

    # -- retention (docs/disk.md) ------------------------------------------------------------------------
    async def count_sessions(self) -> int:
        row = await self._submit(lambda c: c.execute("SELECT count(*) FROM sessions").fetchone())
        return int(row[0])

    async def stale_sessions(self, before: float, limit: int) -> list[SessionStamp]:
        rows = await self._submit(
            lambda c: c.execute(
                "SELECT key, updated_at FROM sessions WHERE updated_at < ? ORDER BY updated_at LIMIT ?",
                (before, limit),
            ).fetchall()
        )
        return [(str(r[0]), float(r[1])) for r in rows]

    async def oldest_sessions(self, limit: int) -> list[SessionStamp]:
        rows = await self._submit(
            lambda c: c.execute(
                "SELECT key, updated_at FROM sessions ORDER BY updated_at LIMIT ?", (limit,)
            ).fetchall()
        )
        return [(str(r[0]), float(r[1])) for r in rows]

    async def delete_sessions_if_idle(
        self, stamps: list[SessionStamp], *, dry_run: bool = False
    ) -> list[str]:
        def op(c: sqlite3.Connection, page: list[SessionStamp]) -> list[str]:
            deleted: list[str] = []
            for key, stamp in page:
                row = c.execute("SELECT updated_at FROM sessions WHERE key=?", (key,)).fetchone()
                if row is None or row[0] > stamp:
                    continue  # gone already, or used again since it was read
                if not dry_run:
                    c.execute("DELETE FROM sessions WHERE key=?", (key,))
                    c.execute("DELETE FROM messages WHERE session_key=?", (key,))
                    c.execute("DELETE FROM transcript_trims WHERE session_key=?", (key,))
                deleted.append(key)
            return deleted

        out: list[str] = []
        for i in range(0, len(stamps), DELETE_PAGE):
            page = stamps[i : i + DELETE_PAGE]
            out += await self._submit(functools.partial(op, page=page))
        return out

    async def trim_transcripts(
        self, keys: list[str], max_messages: int, max_bytes: int, *, dry_run: bool = False
    ) -> int:
        def op(c: sqlite3.Connection, page: list[str]) -> int:
            dropped = 0
            for key in page:
                rows = c.execute(
                    "SELECT id, length(CAST(content AS BLOB)) FROM messages WHERE session_key=? "
                    "ORDER BY id DESC LIMIT ?",
                    (key, max_messages + 1),
                ).fetchall()
                keep = transcript_keep([int(r[1]) for r in rows], max_messages, max_bytes)
                if keep >= len(rows):
                    continue
                oldest_kept = rows[keep - 1][0]
                if dry_run:
                    n = c.execute(
                        "SELECT count(*) FROM messages WHERE session_key=? AND id < ?", (key, oldest_kept)
                    ).fetchone()[0]
                else:
                    n = c.execute(
                        "DELETE FROM messages WHERE session_key=? AND id < ?", (key, oldest_kept)
                    ).rowcount
                    c.execute(
                        "INSERT INTO transcript_trims VALUES (?, ?) ON CONFLICT(session_key) "
                        "DO UPDATE SET dropped = dropped + excluded.dropped",
                        (key, n),
                    )
                dropped += int(n)
            return dropped

        total = 0
        for i in range(0, len(keys), DELETE_PAGE):
            page = keys[i : i + DELETE_PAGE]
            total += await self._submit(functools.partial(op, page=page))
        return total

    async def oversized_transcripts(self, max_messages: int, max_bytes: int, limit: int) -> list[str]:
        rows = await self._submit(
            lambda c: c.execute(
                "SELECT session_key FROM messages GROUP BY session_key "
                "HAVING count(*) > ? OR sum(length(CAST(content AS BLOB))) > ? LIMIT ?",
                (max_messages, max_bytes, limit),
            ).fetchall()
        )
        return [str(r[0]) for r in rows]

    async def transcript_dropped(self, key: str) -> int:
        row = await self._submit(
            lambda c: c.execute("SELECT dropped FROM transcript_trims WHERE session_key=?", (key,)).fetchone()
        )
        return int(row[0]) if row else 0

    async def count_finished_runs_before(self, before: float) -> int:
        row = await self._submit(
            lambda c: c.execute(
                "SELECT count(*) FROM runs WHERE ended_at IS NOT NULL AND ended_at <= ?", (before,)
            ).fetchone()
        )
        return int(row[0])

    async def prune_finished_runs(self, keep_max: int, *, dry_run: bool = False) -> int:
        def op(c: sqlite3.Connection) -> int:
            finished = c.execute("SELECT count(*) FROM runs WHERE ended_at IS NOT NULL").fetchone()[0]
            excess = max(0, int(finished) - keep_max)
            if dry_run or excess == 0:
                return excess
            return int(
                c.execute(
                    "DELETE FROM runs WHERE run_id IN (SELECT run_id FROM runs WHERE ended_at IS NOT NULL "
                    "ORDER BY ended_at LIMIT ?)",
                    (min(excess, DELETE_PAGE * 10),),
                ).rowcount
            )

        total = 0
        while True:
            n = await self._submit(op)
            total += n
            if dry_run or n < DELETE_PAGE * 10:
                return total

    async def table_rows(self) -> dict[str, int]:
        def op(c: sqlite3.Connection) -> dict[str, int]:
            return {
                table: int(c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in ("sessions", "messages", "runs", "subagents")
            }

        return await self._submit(op)

    async def store_bytes(self) -> int:
        return await asyncio.to_thread(_store_bytes, self.path)

    async def compact(self) -> int:
        """Free pages go back to the file system: incremental vacuum on the writer thread (in
        pages, so other writes interleave), then a checkpoint on a connection of its own in a
        worker thread truncates the WAL and the database file."""
        before = await self.store_bytes()

        def vacuum(c: sqlite3.Connection) -> int:
            free = int(c.execute("PRAGMA freelist_count").fetchone()[0])
            n = min(free, VACUUM_PAGES_PER_OP)
            # Each step of this pragma frees one page; sqlite3's execute() steps once.
            for _ in range(n):
                c.execute("PRAGMA incremental_vacuum(1)")
            return free - n

        while await self._submit(vacuum) > 0:
            pass
        await asyncio.to_thread(_checkpoint, self.path)
        return max(0, before - await self.store_bytes())

    async def remove_orphans(self) -> int:
        def op(c: sqlite3.Connection) -> int:
            n = c.execute("DELETE FROM messages WHERE session_key NOT IN (SELECT key FROM sessions)").rowcount
            c.execute("DELETE FROM transcript_trims WHERE session_key NOT IN (SELECT key FROM sessions)")
            return int(n)

        return int(await self._submit(op))

    # -- paged reads (runs.list) -------------------------------------------------------------------
    async def page_runs(self, query: RunsPageQuery) -> RunsPage:
        """Newest first by rowid (insertion order); the cursor is the rowid to continue below."""
        below = parse_int_cursor(query.cursor)

        def op(c: sqlite3.Connection) -> list[tuple[int, bytes]]:
            sql = "SELECT rowid, data FROM runs WHERE rowid < ?"
            args: list[object] = [below if below is not None else 2**63 - 1]
            if query.session_key is not None:
                sql += " AND session_key = ?"
                args.append(query.session_key)
            sql += " ORDER BY rowid DESC LIMIT ?"
            args.append(query.window)
            return list(c.execute(sql, args).fetchall())

        rows = await self._submit(op)
        found: list[RunRecord] = []
        for rowid, data in rows:
            rec = _decode_run(data)
            if rec is not None and query.matches(rec):
                found.append(rec)
                if len(found) == query.limit:
                    return RunsPage(found, str(rowid))
        # A full scan window may have more behind it; a short one was the end of the table.
        return RunsPage(found, str(rows[-1][0]) if rows and len(rows) == query.window else None)


_PUT_RUN = (
    "INSERT INTO runs VALUES (?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET "
    "status=excluded.status, ended_at=excluded.ended_at, data=excluded.data"
)
_SESSION_COLUMNS = (
    "key, session_id, created_at, updated_at, kind, agent_id, label, model, depth, budget_tokens, tokens_used"
)


def _decode_subs(c: sqlite3.Connection, rows: list[Any]) -> tuple[list[SubagentRecord], int]:
    """Decode subagent rows; a row that does not decode is quarantined, never returned or raised.

    One bad row (a torn write, a record from an incompatible build) used to fail the whole
    read: it sorted first in the archive sweep on every tick and, when live, failed the start.
    """
    out: list[SubagentRecord] = []
    bad = 0
    for run_id, data in rows:
        try:
            out.append(_sub_dec.decode(data))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            bad += 1
            log.error("undecodable subagent record quarantined", run_id=run_id, error=str(exc))
            c.execute(
                "INSERT INTO subagents_quarantine(run_id, error, at, data) VALUES (?,?,?,?)",
                (run_id, str(exc)[:500], time.time(), data),
            )
            c.execute("DELETE FROM subagents WHERE run_id=?", (run_id,))
            c.execute(
                "DELETE FROM subagents_quarantine WHERE id <= (SELECT max(id) FROM subagents_quarantine) - ?",
                (QUARANTINE_KEEP,),
            )
    return out, bad


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
        depth=int(row[8] or 0),
        budget_tokens=None if row[9] is None else int(row[9]),
        tokens_used=int(row[10] or 0),
    )


def _decode_run(data: bytes) -> RunRecord | None:
    try:
        return _run_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("undecodable run record", error=str(exc))
        return None


def _op_error(exc: Exception) -> StoreError:
    return StoreError(f"sqlite: {type(exc).__name__}: {exc}")


def _resolve_all(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in items:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _prepare_vacuum(conn: sqlite3.Connection) -> None:
    """Incremental auto-vacuum, so deleted rows give their pages back (docs/disk.md).

    A new file gets it before its first table. A file made without it (auto_vacuum=NONE)
    is rewritten once by VACUUM, the only way SQLite changes that mode on a file with
    tables; this runs on the writer thread while the gateway starts.
    """
    if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            log.info("migrating the store to incremental auto-vacuum (VACUUM, once)")
            conn.execute("VACUUM")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")


def _store_bytes(path: Path) -> int:
    """The database file with its WAL and shared-memory files (stat calls: off the event loop)."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except FileNotFoundError:
            pass
    return total


def _checkpoint(path: Path) -> None:
    """Copy the WAL into the database file and truncate both. TRUNCATE needs a moment with no
    writer; under steady writes that moment may not come within the timeout, and a PASSIVE
    checkpoint then still moves what it can (the WAL is truncated to journal_size_limit later)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=1.0)
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error as exc:  # busy: the next tick tries again
        log.warning("wal checkpoint failed", error=str(exc))
    finally:
        conn.close()
