"""Session keys: `agent:<agentId>:<rest>`; subagent children are `agent:<agentId>:subagent:<uuid>`."""

from __future__ import annotations

import re
import uuid

from clawgate.ids import SessionKey

_KEY_RE = re.compile(r"^agent:([A-Za-z0-9_\-]{1,64}):(?!.*\.\.)[A-Za-z0-9_\-:.]{1,190}$")


def is_valid(key: str) -> bool:
    return _KEY_RE.match(key) is not None


def agent_id_of(key: str) -> str:
    match = _KEY_RE.match(key)
    return match.group(1) if match else "main"


def main_key(agent_id: str = "main") -> SessionKey:
    return SessionKey(f"agent:{agent_id}:main")


def subagent_key(agent_id: str) -> SessionKey:
    return SessionKey(f"agent:{agent_id}:subagent:{uuid.uuid4()}")


def is_subagent(key: str) -> bool:
    return ":subagent:" in key


def kind_of(key: str) -> str:
    if is_subagent(key):
        return "subagent"
    if key.endswith(":main"):
        return "main"
    return "other"


def qualify(raw: str, agent_id: str | None = None) -> SessionKey:
    """A full key from what OpenClaw clients send: `agent:<id>:<rest>` as is, else `<rest>`
    of `agent_id` (default `main`). The result may still be invalid: check `is_valid`."""
    if raw.startswith("agent:"):
        return SessionKey(raw)
    return SessionKey(f"agent:{agent_id or 'main'}:{raw}")
