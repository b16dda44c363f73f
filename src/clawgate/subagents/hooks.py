"""The "subagent ended" hook: a pluggable callback, delivered exactly once per run.

The reference gateway fired "ended" twice for some runs (once at cleanup, once
again from the TTL sweep). Here the reason is recorded on the record, durably,
before any hook is called; a record that already carries a reason is never
reported again (the sweep removes it silently). Delivery is marked done after
the hooks return; a crash in that window re-delivers once on restart with
`redelivery=True`, so a hook that must be strictly exactly-once dedupes on runId.

Every call is bounded by `ended_hook_timeout_s` (`call_hook`): a hook that has not
returned by then is cancelled and abandoned, counted like a hook that raises, and not
re-delivered.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from clawgate.state.clock import Clock

HookOutcome = Literal["ok", "error", "timeout"]


@dataclass(frozen=True)
class SubagentEnded:
    run_id: str
    child_session_key: str
    requester_session_key: str
    reason: str  # deleted | completed | swept | released
    outcome: str | None
    label: str
    mode: str
    ended_at: float | None
    redelivery: bool = False


class SubagentEndedHook(Protocol):
    def on_subagent_ended(self, event: SubagentEnded) -> Awaitable[None] | None: ...


class JsonlEndedHook:
    """Appends one JSON line per ended notification (used by tests and for auditing).

    The file is rotated by size like logging's RotatingFileHandler: past `max_bytes`
    it becomes `<name>.1`, older files shift up, and only `backups` of them are kept,
    so the log is bounded (docs/disk.md). Writes happen on one worker thread, in
    order, never on the event loop.
    """

    def __init__(self, path: Path, *, max_bytes: int = 10 * 1024 * 1024, backups: int = 3) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        # One thread: lines keep the order of the notifications, rotation needs no lock.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clawgate-ended-hook")

    def on_subagent_ended(self, event: SubagentEnded) -> Awaitable[None]:
        line = (json.dumps(asdict(event), separators=(",", ":")) + "\n").encode()
        return asyncio.get_running_loop().run_in_executor(self._executor, self.write, line)

    def write(self, line: bytes) -> None:
        if rotation_due(_size(self.path), len(line), self.max_bytes):
            rotate(self.path, self.backups)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def rotation_due(size: int, incoming: int, max_bytes: int) -> bool:
    """RotatingFileHandler's rule: rotate before a write that would pass the limit (never an empty file)."""
    return size > 0 and size + incoming > max_bytes


def rotate(path: Path, backups: int) -> None:
    """`path` -> `path.1` -> ... -> `path.<backups>`; the oldest is dropped."""
    for i in range(backups - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.1"))


def log_files(path: Path, backups: int) -> list[Path]:
    """The log and its rotated files (for disk accounting)."""
    return [path, *(path.with_name(f"{path.name}.{i}") for i in range(1, backups + 1))]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class RecordingHook:
    """Keeps ended notifications in a list (for in-process tests)."""

    def __init__(self) -> None:
        self.events: list[SubagentEnded] = []

    def on_subagent_ended(self, event: SubagentEnded) -> None:
        self.events.append(event)


# Hook calls abandoned at their timeout that have not finished cancelling yet: kept
# referenced (so the loop does not warn about a destroyed pending task) and bounded by
# how many hooks are timing out at once.
_abandoned: set[asyncio.Future[Any]] = set()


async def call_hook(
    hook: SubagentEndedHook, event: SubagentEnded, clock: Clock, timeout_s: float
) -> HookOutcome:
    """Call one hook; an async hook that has not returned after `timeout_s` (on `clock`) is
    cancelled and abandoned, so a hook that never returns cannot hold a pipeline (or a sweep)."""
    try:
        result = hook.on_subagent_ended(event)
    except Exception:
        return "error"
    if result is None:
        return "ok"
    call = asyncio.ensure_future(result)
    deadline: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    timer = clock.call_later(timeout_s, lambda: _settle(deadline))
    try:
        await asyncio.wait({call, deadline}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        call.cancel()
        raise
    finally:
        timer.cancel()
    if not call.done():
        call.cancel()
        _abandoned.add(call)
        call.add_done_callback(_forget)
        return "timeout"
    if call.cancelled() or call.exception() is not None:
        return "error"
    return "ok"


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _forget(call: asyncio.Future[Any]) -> None:
    _abandoned.discard(call)
    if not call.cancelled():
        call.exception()  # retrieved: a late failure of an abandoned hook is not logged as lost
