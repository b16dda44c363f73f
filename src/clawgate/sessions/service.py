"""Session metadata and transcripts. Metadata is cached in a bounded LRU; the store is the truth."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any, Protocol

from clawgate.ids import RunId, SessionKey
from clawgate.sessions.history import HistoryPage, read_page
from clawgate.sessions.keys import agent_id_of, kind_of
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap
from clawgate.state.weigh import record_bytes
from clawgate.store.base import Store
from clawgate.store.records import SessionMeta, TranscriptMessage

WRITTEN_MIN = 10_000


class SessionObserver(Protocol):
    """Told about every change to sessions and transcripts (e.g. to publish events)."""

    def session_changed(self, key: SessionKey, reason: str, meta: SessionMeta | None) -> None: ...

    def message_appended(self, message: TranscriptMessage, meta: SessionMeta | None) -> None: ...


class SessionService:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        registry: StateRegistry,
        *,
        cache_max: int,
        observer: SessionObserver | None = None,
        cache_max_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.observer = observer
        self.cache: TTLMap[SessionKey, SessionMeta] = TTLMap(
            "session_cache",
            clock,
            max_size=cache_max,
            max_bytes=cache_max_bytes,
            weigh=record_bytes if cache_max_bytes is not None else None,
        )
        registry.register(self.cache)
        # Sessions whose transcript grew since the last retention pass: only these can have
        # passed a transcript bound. Bounded; past the bound the pass scans the store instead.
        self.written: set[SessionKey] = set()
        self.written_max = max(cache_max, WRITTEN_MIN)
        self.written_overflow = False
        registry.add("transcripts_written", self.written.__len__, ttl_s=None, max_size=self.written_max)

    async def touch(
        self, key: SessionKey, *, known_new: bool = False, label: str | None = None, depth: int = 0
    ) -> SessionMeta:
        """Make sure a session exists and mark it updated now. `known_new` skips the store lookup.

        `depth` (a subagent child's spawn depth) is kept with the session, never lowered."""
        now = self.clock.time()
        meta = self.cache.get(key)
        if meta is None and not known_new:
            meta = await self.store.get_session(key)
        created = meta is None
        if meta is None:
            meta = SessionMeta(
                key=key,
                session_id=str(uuid.uuid4()),
                created_at=now,
                updated_at=now,
                kind=kind_of(key),
                agent_id=agent_id_of(key),
                label=label,
                depth=depth,
            )
        else:
            meta.updated_at = now
            meta.depth = max(meta.depth, depth)
        self.cache.set(key, meta)
        self.store.put_session(meta)
        if created and self.observer is not None:
            self.observer.session_changed(key, "new", meta)
        return meta

    async def get(self, key: SessionKey) -> SessionMeta | None:
        meta = self.cache.get(key)
        if meta is None:
            meta = await self.store.get_session(key)
            if meta is not None:
                self.cache.set(key, meta)
        return meta

    async def patch(
        self,
        key: SessionKey,
        *,
        label: str | None,
        model: str | None,
        clear_model: bool = False,
        budget_tokens: int | None = None,
    ) -> SessionMeta:
        """Set what is not None; `clear_model` returns the session to the default model;
        `budget_tokens` 0 removes the session's token budget."""
        meta = await self.touch(key)
        if label is not None:
            meta.label = label
        if model is not None:
            meta.model = model
        elif clear_model:
            meta.model = None
        if budget_tokens is not None:  # 0 removes the budget
            meta.budget_tokens = budget_tokens
        await self.store.put_session(meta)
        if self.observer is not None:
            self.observer.session_changed(key, "patch", meta)
        return meta

    async def reset(self, key: SessionKey) -> None:
        meta = await self.get(key)
        new_id = str(uuid.uuid4())
        if meta is not None:
            meta.session_id = new_id
            meta.updated_at = self.clock.time()
        await self.store.reset_session(key, new_id, self.clock.time())
        if self.observer is not None:
            self.observer.session_changed(key, "reset", meta)

    async def delete(self, key: SessionKey) -> None:
        self.cache.pop(key)
        await self.store.delete_session(key)
        if self.observer is not None:
            self.observer.session_changed(key, "delete", None)

    def append(
        self, key: SessionKey, role: str, content: str, run_id: RunId | None = None
    ) -> Awaitable[None]:
        """Append to the transcript. Callers need not await it (the store groups it into a
        transaction); awaiting it waits until it is durable."""
        self.mark_written(key)
        message = TranscriptMessage(
            session_key=key, role=role, content=content, ts=self.clock.time(), run_id=run_id
        )
        written = self.store.append_message(message)
        self.message_appended(message)
        return written

    async def append_to_existing(self, message: TranscriptMessage) -> bool:
        """Append only if the session still exists, atomically with the check (the store's
        `append_to_existing`); True when appended. Counted toward the transcript bounds and
        told to the session's subscribers (`session.message`) like `append`."""
        self.mark_written(message.session_key)
        appended = await self.store.append_to_existing(message)
        if appended:
            self.message_appended(message)
        return appended

    def message_appended(self, message: TranscriptMessage) -> None:
        """Tell the session's subscribers (`session.message`) of a message appended to its
        transcript: by `append`, `append_to_existing`, or the store itself (a fenced end's
        reply, `RunRecord.reply_message`; marked by `mark_written` before its write)."""
        if self.observer is not None:
            self.observer.message_appended(message, self.cache.get(message.session_key))

    def mark_written(self, key: SessionKey) -> None:
        """Retention trims the transcripts written since its last pass (`take_written`): every
        transcript write is marked, also one the store makes itself (a fenced run's reply)."""
        if len(self.written) < self.written_max:
            self.written.add(key)
        elif key not in self.written:
            self.written_overflow = True

    async def history(self, key: SessionKey, limit: int) -> list[TranscriptMessage]:
        return await self.store.history(key, limit)

    async def open_for_run(
        self, key: SessionKey, limit: int, *, known_new: bool = False
    ) -> list[TranscriptMessage]:
        """`touch` the session a run starts in and read its last `limit` messages.

        The history read is issued first and the session lookup (when the session is not
        cached) in the same loop turn, so the store answers both at once: on Redis one
        pipeline round trip instead of two in sequence. No task is made for it."""
        messages = asyncio.ensure_future(self.store.history(key, limit))
        try:
            await self.touch(key, known_new=known_new)
        except BaseException:
            messages.add_done_callback(_retrieved)  # failing too must not log "never retrieved"
            raise
        return await messages

    # -- retention (retention/service.py) ----------------------------------------------------------
    def take_written(self, *, peek: bool = False) -> tuple[list[str], bool]:
        """Sessions written to since the last pass, and whether that set overflowed."""
        keys: list[str] = list(self.written)
        overflow = self.written_overflow
        if not peek:
            self.written.clear()
            self.written_overflow = False
        return keys, overflow

    def forget(self, keys: list[str]) -> None:
        """Sessions deleted by retention leave the cache with their rows."""
        for key in keys:
            self.cache.pop(SessionKey(key))
            self.written.discard(SessionKey(key))

    async def dropped(self, key: SessionKey) -> int:
        """Messages retention dropped from this transcript (chat.history says it was truncated)."""
        return await self.store.transcript_dropped(key)

    async def history_page(
        self, key: SessionKey, *, before: int | None, limit: int, budget: int
    ) -> HistoryPage:
        """One `chat.history` page: at most `limit` messages whose JSON takes at most `budget` bytes."""
        return await read_page(self.store, key, before=before, limit=limit, budget=budget)


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
