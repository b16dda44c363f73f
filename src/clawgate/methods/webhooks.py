"""`webhooks.list` (pending deliveries and dead letters) and `webhooks.retry` (put one back)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import READ, WRITE

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core


class WebhooksListParams(msgspec.Struct, rename="camel", kw_only=True):
    state: Literal["pending", "dead"] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class WebhooksRetryParams(msgspec.Struct, rename="camel", kw_only=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


async def list_deliveries(gw: Core, conn: Caller, req_id: str, p: WebhooksListParams) -> dict[str, Any]:
    found = await gw.webhooks.list(p.state, p.limit)
    await gw.webhooks.refresh_counts()
    return {"deliveries": [d.to_wire() for d in found], **gw.webhooks.describe()}


async def retry(gw: Core, conn: Caller, req_id: str, p: WebhooksRetryParams) -> dict[str, Any]:
    d = await gw.webhooks.retry(p.id)
    return {"ok": True, "delivery": d.to_wire()}


METHODS = [
    MethodSpec("webhooks.list", WebhooksListParams, READ, list_deliveries),
    MethodSpec("webhooks.retry", WebhooksRetryParams, WRITE, retry),
]
