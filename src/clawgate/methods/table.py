"""The method table: name -> params schema, required scope, handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clawgate.protocol.constants import READ, WRITE

if TYPE_CHECKING:
    from clawgate.server.connection import Connection
    from clawgate.server.gateway import Gateway


class Deferred:
    """Returned by handlers that send their responses themselves (e.g. `agent`'s two answers)."""


DEFERRED = Deferred()

Handler = Callable[["Gateway", "Connection", str, Any], Awaitable[Any]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[Any]
    scope: str
    handler: Handler


def build_table() -> dict[str, MethodSpec]:
    from clawgate.methods import (
        absent,
        agent,
        agents,
        catalog,
        core,
        cron,
        runs,
        sessions,
        subagents,
        usage,
        webhooks,
    )

    table: dict[str, MethodSpec] = {}
    # `agents` after `catalog`: its profile-based agents.list / models.list replace the
    # settings-based ones.
    for module in (core, agent, sessions, subagents, cron, usage, runs, webhooks, catalog, agents, absent):
        for spec in module.METHODS:
            table[spec.name] = spec
    return table


__all__ = ["DEFERRED", "READ", "WRITE", "Deferred", "MethodSpec", "build_table"]
