"""`health`, `status`, `events.subscribe`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clawgate.errors import Forbidden
from clawgate.ids import SessionKey
from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import READ
from clawgate.protocol.schemas import EmptyParams, SubscribeParams

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core

MAX_SUBSCRIPTIONS = 1000


async def health(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    now = gw.clock.time()
    return {"ok": True, "ts": int(now * 1000), "uptimeMs": gw.uptime_ms()}


async def status(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    return await gw.status()


async def subscribe(gw: Core, conn: Caller, req_id: str, params: SubscribeParams) -> dict[str, Any]:
    keys = [SessionKey(k) for k in params.session_keys or []]
    # Count distinct keys: subscribing again to a key already held is not a new subscription.
    if len(conn.subscribed.union(keys)) > MAX_SUBSCRIPTIONS:
        raise Forbidden(
            f"at most {MAX_SUBSCRIPTIONS} session subscriptions per connection",
            details={"maxSubscriptions": MAX_SUBSCRIPTIONS},
        )
    gw.bus.subscribe(conn.conn_id, keys, params.all)  # may refuse: then nothing was added
    conn.subscribed.update(keys)
    return {"ok": True}


METHODS = [
    MethodSpec("health", EmptyParams, READ, health),
    MethodSpec("status", EmptyParams, READ, status),
    MethodSpec("events.subscribe", SubscribeParams, READ, subscribe),
]
