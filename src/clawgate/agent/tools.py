"""Agent tools. `sessions_spawn` shares its code path with the `sessions.spawn` RPC."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from clawgate.providers.base import ToolSpec


@dataclass(frozen=True)
class ToolCallContext:
    run_id: str
    session_key: str
    agent_id: str


ToolHandler = Callable[[ToolCallContext, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    handler: ToolHandler


SESSIONS_SPAWN_SPEC = ToolSpec(
    name="sessions_spawn",
    description="Spawn a subagent that works on a task in its own session; its result is announced back.",
    parameters={
        "type": "object",
        "properties": {
            "task": {"type": "string", "description": "what the subagent should do"},
            "label": {"type": "string"},
            "agentId": {"type": "string"},
            "model": {"type": "string"},
            "runTimeoutSeconds": {"type": "number"},
            "mode": {"type": "string", "enum": ["run", "session"]},
            "cleanup": {"type": "string", "enum": ["keep", "delete"]},
        },
        "required": ["task"],
    },
)
