"""The "subagent ended" hook: a pluggable callback, delivered exactly once per run.

The reference gateway fired "ended" twice for some runs (once at cleanup, once
again from the TTL sweep). Here the reason is recorded on the record, durably,
before any hook is called; a record that already carries a reason is never
reported again (the sweep removes it silently). Delivery is marked done after
the hooks return; a crash in that window re-delivers once on restart with
`redelivery=True`, so a hook that must be strictly exactly-once dedupes on runId.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol


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
    """Appends one JSON line per ended notification (used by tests and for auditing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def on_subagent_ended(self, event: SubagentEnded) -> None:
        line = json.dumps(asdict(event), separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class RecordingHook:
    """Keeps ended notifications in a list (for in-process tests)."""

    def __init__(self) -> None:
        self.events: list[SubagentEnded] = []

    def on_subagent_ended(self, event: SubagentEnded) -> None:
        self.events.append(event)
