"""`usage.status` and `usage.cost` (OpenClaw's names): tokens and cost from the daily aggregates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import READ

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core


class UsageCostParams(msgspec.Struct, rename="camel", kw_only=True):
    days: Annotated[int, msgspec.Meta(ge=1, le=3660)] = 30


class UsageStatusParams(msgspec.Struct, rename="camel", kw_only=True):
    pass


async def cost(gw: Core, conn: Caller, req_id: str, p: UsageCostParams) -> dict[str, Any]:
    return await gw.usage.cost(min(p.days, gw.settings.usage_retention_days))


async def status(gw: Core, conn: Caller, req_id: str, p: UsageStatusParams) -> dict[str, Any]:
    today = await gw.usage.cost(1)
    provider = gw.provider_stats()
    return {
        "updatedAt": today["updatedAt"],
        "today": today["totals"],
        "providers": [
            {
                "provider": provider.get("name"),
                "displayName": provider.get("name"),
                "windows": [],  # no quota windows: clawgate reports what it counted, not a plan
                "circuits": provider.get("circuits", {}),
            }
        ],
    }


METHODS = [
    MethodSpec("usage.status", UsageStatusParams, READ, status),
    MethodSpec("usage.cost", UsageCostParams, READ, cost),
]
