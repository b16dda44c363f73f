"""The method table: name -> params schema, required scope, handler (built once, at import)."""

from __future__ import annotations

from clawgate.methods import (
    absent,
    agent,
    agents,
    catalog,
    cron,
    runs,
    sessions,
    subagents,
    system,
    usage,
    webhooks,
)
from clawgate.methods.spec import DEFERRED, Deferred, MethodSpec
from clawgate.protocol.constants import READ, WRITE

# `agents` after `catalog`: its profile-based agents.list / models.list replace the
# settings-based ones.
MODULES = (system, agent, sessions, subagents, cron, usage, runs, webhooks, catalog, agents, absent)
METHODS: dict[str, MethodSpec] = {spec.name: spec for module in MODULES for spec in module.METHODS}


def build_table() -> dict[str, MethodSpec]:
    """A copy of the table (a gateway may add to its own)."""
    return dict(METHODS)


__all__ = ["DEFERRED", "METHODS", "READ", "WRITE", "Deferred", "MethodSpec", "build_table"]
