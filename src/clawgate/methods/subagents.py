"""`sessions.spawn`, `subagents.list`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clawgate.automation.webhook_rules import check_url
from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import READ, WRITE
from clawgate.protocol.schemas import SpawnParams, SubagentsListParams

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core


async def spawn(gw: Core, conn: Caller, req_id: str, params: SpawnParams) -> dict[str, Any]:
    gw.admission.check()
    if params.webhook is not None:
        check_url(params.webhook)
    return await gw.subagents.spawn(params)


async def list_runs(gw: Core, conn: Caller, req_id: str, params: SubagentsListParams) -> dict[str, Any]:
    records = await gw.subagents.list(params.session_key, params.limit)
    return {"runs": [r.to_wire() for r in records]}


METHODS = [
    MethodSpec("sessions.spawn", SpawnParams, WRITE, spawn),
    MethodSpec("subagents.list", SubagentsListParams, READ, list_runs),
]
