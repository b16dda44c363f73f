"""The store interface shared by the SQLite and Redis backends.

Writes return awaitables that resolve once the write is durable; callers on
the hot path (transcript appends, event-driven updates) do not await them, and
the backend groups them into transactions / pipelines. Callers that promise
durability to a client (accepting a run, recording its end) await them.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from clawgate.store.records import RunRecord, SessionMeta, SubagentRecord, TranscriptMessage
from clawgate.store.run_pages import RunsPage, RunsPageQuery

log = structlog.get_logger("clawgate.store")


SessionStamp = tuple[str, float]  # (session key, updated_at) as the store holds it


@dataclass(frozen=True, slots=True)
class SessionGate:
    """A check of a new run's session as the store holds it, made by `Store.create_run`
    with the insert (a session past its token budget refuses new runs).

    `refuses` is a pure function of the record: the SQLite store calls it on its writer
    thread, inside the insert's transaction. `refusal` makes the error `create_run` raises,
    on the event loop. A session the store does not have is not checked.
    """

    refuses: Callable[[SessionMeta], bool]
    refusal: Callable[[SessionMeta], Exception]


class RetentionStore(ABC):
    """What the retention rules need from a store (retention/service.py; docs/disk.md).

    The store only moves data: which sessions are idle, which go first and what is
    protected are decided by retention/policy.py. Deletes re-check the session's
    `updated_at` against the stamp that was read, atomically, so a session used again
    between the read and the delete is kept.
    """

    @abstractmethod
    async def count_sessions(self) -> int: ...

    @abstractmethod
    async def stale_sessions(self, before: float, limit: int) -> list[SessionStamp]:
        """Sessions last updated before `before`, least recently updated first."""

    @abstractmethod
    async def oldest_sessions(self, limit: int) -> list[SessionStamp]:
        """The `limit` least recently updated sessions, oldest first."""

    @abstractmethod
    async def delete_sessions_if_idle(
        self, stamps: list[SessionStamp], *, dry_run: bool = False
    ) -> list[str]:
        """Delete each session with its transcript unless it was updated after its stamp.

        Returns the keys deleted (or, with `dry_run`, that would be)."""

    @abstractmethod
    async def trim_transcripts(
        self, keys: list[str], max_messages: int, max_bytes: int, *, dry_run: bool = False
    ) -> int:
        """Drop the oldest messages of each transcript past the bounds; returns messages dropped."""

    @abstractmethod
    async def oversized_transcripts(self, max_messages: int, max_bytes: int, limit: int) -> list[str]:
        """Sessions whose transcript may be over a bound (a full scan; used when the set of
        sessions written to since the last pass overflowed)."""

    @abstractmethod
    async def transcript_dropped(self, key: str) -> int:
        """Messages dropped from this session's transcript by retention since its creation or reset."""

    @abstractmethod
    async def count_finished_runs_before(self, before: float) -> int: ...

    @abstractmethod
    async def prune_finished_runs(self, keep_max: int, *, dry_run: bool = False) -> int:
        """Delete the finished run records that ended first, past `keep_max`; returns how many."""

    @abstractmethod
    async def table_rows(self) -> dict[str, int]:
        """Rows (records) per table: sessions, messages, runs, subagents."""

    @abstractmethod
    async def store_bytes(self) -> int:
        """Bytes the store occupies (SQLite: its files; Redis: the memory of its keys)."""

    async def compact(self) -> int:
        """Give freed space back to the file system; returns bytes given back."""
        return 0

    async def remove_orphans(self) -> int:
        """Remove records nothing can reach any more (a crash between two writes); at start-up."""
        return 0


@dataclass(frozen=True, slots=True)
class Fence:
    """A lease a write depends on: the write is valid only while the key `key` (in the
    same Redis) holds `token`. Runs executed from the shared Redis queue carry the lease
    of their session, so a process that lost it can no longer end them."""

    key: str
    token: str


class Store(RetentionStore):
    kind: str = "abstract"
    # Undecodable subagent rows moved aside by the reads that met them (status, metrics).
    subagents_quarantined: int = 0
    # Several gateway processes share this store (claims on subagent records matter).
    shared_by_processes: bool = False
    # A failed run-end write is retried until the store answers (runs/endwrite.py): true for a
    # store behind a network (Redis restarting, a partition), not for a local file, whose
    # failures (a full disk) do not heal by waiting and whose open runs are ended at restart.
    retries_end_writes: bool = False

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Flush pending writes and release resources. Idempotent."""

    @abstractmethod
    async def ping(self) -> bool: ...

    @property
    def closed(self) -> bool:
        """Closed for good: a failed write is not worth retrying."""
        return False

    def is_outage(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by a call to this store's client, means the store cannot be
        reached right now (the request is answered UNAVAILABLE, retryable, not INTERNAL)."""
        return False

    def connection(self) -> dict[str, object]:
        """Connection state for status and /metrics; a store without a connection is always up."""
        return {"up": True, "lastError": None, "failures": 0, "reconnects": 0}

    async def flush(self) -> None:
        """Wait until every write enqueued so far is durable."""
        await self.barrier()

    @abstractmethod
    def barrier(self) -> Awaitable[None]: ...

    # -- sessions ---------------------------------------------------------------------
    @abstractmethod
    def put_session(self, meta: SessionMeta) -> Awaitable[None]: ...

    @abstractmethod
    async def get_session(self, key: str) -> SessionMeta | None: ...

    @abstractmethod
    async def list_sessions(
        self, *, limit: int, updated_since: float | None = None, prefix: str | None = None
    ) -> list[SessionMeta]: ...

    @abstractmethod
    def add_session_tokens(self, key: str, tokens: int) -> Awaitable[None]:
        """Add to the tokens a session's runs have used (its budget's count); no-op when it is gone."""

    @abstractmethod
    def delete_session(self, key: str) -> Awaitable[None]:
        """Delete a session with its transcript."""

    @abstractmethod
    def reset_session(self, key: str, new_session_id: str, now: float) -> Awaitable[None]:
        """Clear a session's transcript and give it a new session id."""

    # -- transcripts -----------------------------------------------------------------
    @abstractmethod
    def append_message(self, msg: TranscriptMessage) -> Awaitable[None]: ...

    @abstractmethod
    def append_to_existing(self, msg: TranscriptMessage) -> Awaitable[bool]:
        """Append only if the session exists (and mark it updated), atomically with the check.

        For writes that must never re-create a deleted session (an announce that was in
        flight when its requester was deleted). Returns whether the message was appended.
        """

    @abstractmethod
    def history(self, session_key: str, limit: int) -> Awaitable[list[TranscriptMessage]]:
        """The last `limit` messages, oldest first. Issued when called, not when awaited, so
        a caller can send it together with another store call (one round trip on Redis)."""

    @abstractmethod
    async def history_before(
        self, session_key: str, before: int | None, limit: int, clip_chars: int
    ) -> list[tuple[int, TranscriptMessage]]:
        """Up to `limit` messages older than position `before` (None: the newest), newest first.

        Each comes with its position: passing it back as `before` continues with older
        messages. A content longer than `clip_chars` characters is returned cut to
        `clip_chars + 1`, so a caller can tell it was longer without reading it whole.
        """

    # -- runs --------------------------------------------------------------------------
    @abstractmethod
    def put_run(self, rec: RunRecord) -> Awaitable[None]: ...

    async def end_run(self, rec: RunRecord, fence: Fence | None = None) -> RunRecord | None:
        """Durably record the end of a run (`rec` is final), unless the run already has an end
        or `fence` no longer holds. Returns the run's end as stored: `rec` itself when it was
        written, the end another writer stored first, or None when the fence is gone and the
        run has no end yet (a live process holding the lease will end it).

        A single-process store has no competing writers (the run service ends a run once):
        it writes and returns `rec`.
        """
        await self.put_run(rec)
        return rec

    @abstractmethod
    async def create_run(
        self, rec: RunRecord, *, reuse_after_s: float, now: float, gate: SessionGate | None = None
    ) -> RunRecord | None:
        """Durably insert a newly accepted run, atomically with the idempotency check.

        Returns None when `rec` was inserted, or the existing record when a run with
        the same id exists and is unfinished or was accepted less than
        `reuse_after_s` ago (then nothing is written). An older finished record is
        replaced: the idempotency key has expired.

        With a `gate`, a run that would be inserted is first checked against its session's
        stored record; when the gate refuses, nothing is written and `gate.refusal` is
        raised. SQLite checks in the insert's transaction (one writer round trip). Redis
        checks in the insert's script; a session there that has a budget sends its record
        back to be checked here, and the insert follows in a second script (not atomic with
        the check: with several processes a budget is a soft bound anyway).
        """

    @abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    async def unfinished_runs(self) -> list[RunRecord]:
        """Runs accepted but without an end (for restore after a crash)."""

    @abstractmethod
    async def count_runs(self, session_key: str | None = None) -> int: ...

    @abstractmethod
    async def sweep_runs(self, before: float) -> int:
        """Delete finished run records that ended before `before`."""

    # -- idempotency -----------------------------------------------------------------------
    @abstractmethod
    async def claim_key(self, key: str, run_id: str, ttl_s: float, now: float) -> str | None:
        """Atomically bind `key` to `run_id` unless bound already; returns the existing run id or None."""

    # -- subagent registry ---------------------------------------------------------------------
    @abstractmethod
    def put_subagent(self, rec: SubagentRecord) -> Awaitable[None]:
        """Insert or replace (used when a record is created)."""

    @abstractmethod
    def update_subagent(self, rec: SubagentRecord) -> Awaitable[bool]:
        """Replace a record only if it still exists; returns whether it did.

        Every write after the spawn goes through here, so a pipeline that finishes late
        can never re-insert a record the sweep (of any process) has already removed.
        """

    @abstractmethod
    async def get_subagent(self, run_id: str) -> SubagentRecord | None: ...

    @abstractmethod
    async def list_subagents(self, requester: str | None, limit: int) -> list[SubagentRecord]: ...

    @abstractmethod
    async def live_subagents(self) -> list[SubagentRecord]:
        """Records whose cleanup has not completed or whose ended hook is not delivered."""

    @abstractmethod
    async def due_subagents(self, now: float, limit: int) -> list[SubagentRecord]:
        """Records whose `expires_at` has passed (the TTL sweep removes them)."""

    @abstractmethod
    def delete_subagent(self, run_id: str) -> Awaitable[None]: ...

    @abstractmethod
    async def count_subagents(self) -> int: ...

    async def claim_subagent(self, run_id: str, owner: str, now: float, lease_s: float) -> bool:
        """Take or extend `owner`'s lease on a record (its pipeline or its sweep works on it).

        False when the record is gone or another owner's lease has not expired. A store
        used by one process needs no claims: that process' own bookkeeping suffices.
        """
        return True

    async def release_subagent(self, run_id: str, owner: str) -> None:
        """Drop `owner`'s lease, if it still holds it."""
        return None

    @abstractmethod
    async def page_runs(self, query: RunsPageQuery) -> RunsPage:
        """One bounded page of run records, newest first, and the cursor of the next page.

        A page examines at most `query.scan` records, so a filter that matches little answers
        quickly with fewer than `limit` runs and a cursor to go on from (None: no more).
        """


def settle_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def settle_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


T = TypeVar("T")


def log_write_failure(fut: asyncio.Future[Any]) -> None:
    """Done-callback for writes nobody awaits: log a failure instead of "exception never retrieved"."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("store write failed", error=str(fut.exception()))


def done_future(value: T) -> asyncio.Future[T]:
    """An answer known without asking the store, as the future a store call would give."""
    fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut
