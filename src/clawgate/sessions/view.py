"""Wire views of sessions and transcript messages, shaped as OpenClaw clients read them.

Pure functions: the methods (`sessions.describe`, `sessions.create`, ...) and the session
events (`sessions.changed`, `session.message`) build their payloads here, so a session
looks the same in an answer and in an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clawgate.settings import Settings
from clawgate.store.records import SessionMeta, TranscriptMessage


@dataclass(frozen=True)
class ModelDefaults:
    """The one model a gateway runs: its provider and model name (from the settings)."""

    provider: str
    model: str

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelDefaults:
        if settings.provider == "openai":
            return cls("openai", settings.openai_model)
        # The scripted provider has no model names: it answers every model the same way.
        return cls(settings.provider, settings.provider)

    def to_wire(self) -> dict[str, Any]:
        """OpenClaw's session `defaults` (no context-window figure: clawgate does not know it)."""
        return {"modelProvider": self.provider, "model": self.model, "contextTokens": None}


def ms(seconds: float) -> int:
    return int(seconds * 1000)


def session_row(meta: SessionMeta, defaults: ModelDefaults) -> dict[str, Any]:
    """One session as `sessions.describe`, `sessions.create` and `sessions.changed` show it."""
    row: dict[str, Any] = {
        "key": meta.key,
        "sessionId": meta.session_id,
        "agentId": meta.agent_id,
        "kind": meta.kind,
        "createdAt": ms(meta.created_at),
        "updatedAt": ms(meta.updated_at),
        "modelProvider": defaults.provider,
        "model": meta.model or defaults.model,
    }
    if meta.label:
        row["label"] = meta.label
        row["displayName"] = meta.label
    return row


def message_id(message: TranscriptMessage) -> str | None:
    """A stable id: a run appends at most one user and one assistant message."""
    return f"{message.run_id}:{message.role}" if message.run_id else None


def transcript_identity(message: TranscriptMessage) -> dict[str, Any] | None:
    """OpenClaw's `__openclaw` message metadata: the id and run that identify a message.

    OpenClaw clients match the messages of `chat.history`, `session.message` and their own
    pending sends by it; without it they show a message twice after a history reload.
    """
    mid = message_id(message)
    return {"id": mid, "runId": message.run_id} if mid is not None else None


def chat_message(message: TranscriptMessage) -> dict[str, Any]:
    """A transcript message in OpenClaw's chat shape (content blocks, millisecond timestamp)."""
    out: dict[str, Any] = {
        "role": message.role,
        "content": [{"type": "text", "text": message.content}],
        "timestamp": ms(message.ts),
    }
    identity = transcript_identity(message)
    if identity is not None:
        out["__openclaw"] = identity
    return out
