"""Agent tools: a spec the model sees, a handler, and the scope a caller needs to use it.

`sessions_spawn` shares its code path with the `sessions.spawn` RPC; the other session tools
(`tools/session_tools.py`) with theirs; MCP tools come from `tools/mcp.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from clawgate.protocol.constants import SCOPE_NAMES
from clawgate.providers.base import ToolSpec

READ_SCOPE, WRITE_SCOPE, ADMIN_SCOPE = SCOPE_NAMES
_RANK = {name: n for n, name in enumerate(SCOPE_NAMES, start=1)}
# A run started without a connection (cron, restored after a restart, hooks) was accepted by
# something allowed to start runs: read and write, never admin.
DEFAULT_RUN_SCOPES = frozenset({READ_SCOPE, WRITE_SCOPE})


def scopes_allow(scopes: frozenset[str], needed: str) -> bool:
    rank = _RANK[needed]
    return any(_RANK.get(s, 0) >= rank for s in scopes)


@dataclass(frozen=True)
class ToolCallContext:
    run_id: str
    session_key: str
    agent_id: str
    # The scopes of whoever started the run: a tool needing more is refused.
    scopes: frozenset[str] = field(default=DEFAULT_RUN_SCOPES)


ToolHandler = Callable[[ToolCallContext, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    handler: ToolHandler
    scope: str = WRITE_SCOPE
    source: str = "builtin"  # "builtin" | "mcp:<server>"


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
