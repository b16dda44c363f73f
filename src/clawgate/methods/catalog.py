"""`agents.list`, `models.list`, `commands.list`, `config.get`: what this gateway offers.

OpenClaw's interactive clients read these to fill their pickers and autocompletion.
clawgate has one agent (`main`) and one model (the configured provider's), and the
answers say exactly that; `config.get` is a read-only view of the settings with every
secret removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import READ
from clawgate.protocol.schemas import EmptyParams
from clawgate.settings import Settings

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core

DEFAULT_AGENT = "main"

# The slash commands clawgate serves, each through the methods named in its description.
# OpenClaw's terminal UI runs them itself (it calls those methods); other clients show
# this list for autocompletion.
COMMANDS: tuple[tuple[str, str, bool], ...] = (
    ("new", "Start a new session (sessions.create)", False),
    ("reset", "Reset the current session: new session id, empty transcript (sessions.reset)", False),
    ("abort", "Abort the active run (chat.abort)", False),
    ("model", "Set the session's model (sessions.patch)", True),
)


def agents_result() -> dict[str, Any]:
    return {
        "defaultId": DEFAULT_AGENT,
        "mainKey": "main",
        "scope": "per-sender",
        "agents": [{"id": DEFAULT_AGENT, "name": DEFAULT_AGENT}],
    }


def command_entries() -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "textAliases": [f"/{name}"],
            "description": description,
            "category": "session",
            "source": "native",
            "scope": "text",
            "acceptsArgs": accepts_args,
        }
        for name, description, accepts_args in COMMANDS
    ]


def redacted_config(settings: Settings) -> dict[str, Any]:
    """The settings without the token, API keys or credentials inside the store URL."""
    view = settings.redacted()
    store = view.get("store")
    if isinstance(store, str) and "@" in store:
        parts = urlsplit(store)
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        view["store"] = urlunsplit(parts._replace(netloc=netloc))
    return view


async def list_agents(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    return agents_result()


async def list_models(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    d = gw.model_defaults
    return {"models": [{"id": d.model, "name": d.model, "provider": d.provider}]}


async def list_commands(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    return {"commands": command_entries()}


async def get_config(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    view = redacted_config(gw.settings)
    # Read-only: clawgate's settings come from flags, environment and a TOML file, and
    # change only on restart, so there is no path, hash or raw text to edit.
    return {"exists": True, "valid": True, "issues": [], "config": view, "runtimeConfig": view}


METHODS = [
    MethodSpec("agents.list", EmptyParams, READ, list_agents),
    MethodSpec("models.list", EmptyParams, READ, list_models),
    MethodSpec("commands.list", EmptyParams, READ, list_commands),
    MethodSpec("config.get", EmptyParams, READ, get_config),
]
