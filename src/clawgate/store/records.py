"""The persisted records. Plain msgspec structs: encoded as JSON for Redis, as rows for SQLite."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from clawgate.ids import RunId, SessionKey
from clawgate.protocol.constants import FINAL_STATUSES, RunStatus

EndedReason = Literal["deleted", "completed", "swept", "released"]


class SessionMeta(msgspec.Struct, kw_only=True):
    key: str
    session_id: str
    created_at: float
    updated_at: float
    kind: str = "main"
    agent_id: str = "main"
    label: str | None = None
    model: str | None = None
    # Spawn depth of a subagent child session (0: not a child). Kept with the session, so
    # the depth limit still holds for a child whose subagent record has been swept.
    depth: int = 0
    # Token budget of the session (None: none) and the tokens its runs have used so far,
    # added at each run's end; past the budget new runs are refused.
    budget_tokens: int | None = None
    tokens_used: int = 0


class TranscriptMessage(msgspec.Struct, kw_only=True):
    session_key: SessionKey
    role: str
    content: str
    ts: float
    run_id: RunId | None = None


class RunRecord(msgspec.Struct, kw_only=True):
    run_id: RunId
    session_key: SessionKey
    agent_id: str
    message: str
    status: RunStatus = "queued"
    kind: Literal["main", "subagent"] = "main"
    model: str | None = None
    timeout_s: float = 600.0
    extra_system_prompt: str | None = None
    accepted_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    result_text: str | None = None
    duration_ms: int | None = None
    usage: dict[str, Any] | None = None  # provider tokens: {input, output, total, model, costUsd?}
    # What the run belongs to, as its client named it (`clawgate batch`: `batch:<tasks file>`).
    label: str | None = None
    webhook: str | None = None  # where the final answer is POSTed (automation/webhooks.py)
    # The seqs of the run's end events ([agent lifecycle, chat]), written with the end by the
    # process that executed it, so another process can tell the end with the same seqs when
    # the executor died before its events went out (scaleout/member.py, `reconcile_once`).
    end_seqs: list[int] | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def reply_message(self) -> TranscriptMessage | None:
        """The transcript line of an ended run's reply (None: no reply to keep).

        A run from the shared Redis queue has its reply written by its fenced end's own
        script (`RedisStore.end_run`); the run service tells it to the session's subscribers
        from this same message once that end is stored."""
        if self.status != "ok" or not self.result_text:
            return None
        return TranscriptMessage(
            session_key=self.session_key,
            role="assistant",
            content=self.result_text,
            ts=self.ended_at or 0.0,
            run_id=self.run_id,
        )


class SubagentRecord(msgspec.Struct, kw_only=True):
    run_id: RunId
    child_session_key: SessionKey
    requester_session_key: SessionKey
    task: str
    agent_id: str = "main"
    label: str = ""
    mode: Literal["run", "session"] = "run"
    cleanup: Literal["keep", "delete"] = "keep"
    model: str | None = None
    run_timeout_s: float | None = None
    depth: int = 1
    status: Literal["pending", "running", "ended"] = "pending"
    outcome: str | None = None  # ok | error | timeout | aborted
    error: str | None = None
    frozen_result: str | None = None
    created_at: float = 0.0
    ended_at: float | None = None
    announced_at: float | None = None
    cleanup_completed_at: float | None = None
    ended_reason: EndedReason | None = None
    ended_notified: bool = False
    expires_at: float | None = None  # when the sweep removes the record (set at cleanup)
    attachments_dir: str | None = None
    sweep_failures: int = 0  # consecutive failed archive attempts (the sweep backs off)

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {
            "runId": self.run_id,
            "childSessionKey": self.child_session_key,
            "requesterSessionKey": self.requester_session_key,
            "label": self.label,
            "mode": self.mode,
            "cleanup": self.cleanup,
            "status": self.outcome if self.status == "ended" and self.outcome else self.status,
            "createdAt": int(self.created_at * 1000),
        }
        if self.ended_at is not None:
            out["endedAt"] = int(self.ended_at * 1000)
        if self.cleanup_completed_at is not None:
            out["cleanupCompletedAt"] = int(self.cleanup_completed_at * 1000)
        return out
