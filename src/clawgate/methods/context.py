"""What a method handler sees of the gateway (`Core`) and of the connection asking (`Caller`).

Handlers depend on these protocols, not on `server/`: the gateway and the WebSocket
connection satisfy them structurally (mypy checks it where the method table is built
and where the gateway dispatches), and so can any other host of the method table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from clawgate.admission import Admission
    from clawgate.automation.cron import CronService
    from clawgate.automation.usage import UsageLedger
    from clawgate.automation.webhooks import WebhookService
    from clawgate.events.bus import EventBus
    from clawgate.ids import ConnId, SessionKey
    from clawgate.providers.base import Provider
    from clawgate.retention.service import Retention
    from clawgate.runs.service import RunService
    from clawgate.sessions.service import SessionService
    from clawgate.sessions.view import ModelDefaults
    from clawgate.settings import Settings
    from clawgate.state.clock import Clock
    from clawgate.store.base import Store
    from clawgate.subagents.service import SubagentService


class Core(Protocol):
    """The gateway's components and the few gateway-wide answers handlers use."""

    @property
    def settings(self) -> Settings: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def store(self) -> Store: ...
    @property
    def bus(self) -> EventBus: ...
    @property
    def sessions(self) -> SessionService: ...
    @property
    def runs(self) -> RunService: ...
    @property
    def subagents(self) -> SubagentService: ...
    @property
    def admission(self) -> Admission: ...
    @property
    def cron(self) -> CronService: ...
    @property
    def usage(self) -> UsageLedger: ...
    @property
    def webhooks(self) -> WebhookService: ...
    @property
    def retention(self) -> Retention: ...
    @property
    def provider(self) -> Provider: ...
    @property
    def model_defaults(self) -> ModelDefaults: ...

    async def status(self) -> dict[str, Any]: ...
    def uptime_ms(self) -> int: ...
    def provider_stats(self) -> dict[str, Any]: ...


class Scoped(Protocol):
    """What a handler reads of the caller's grant: the scopes it holds."""

    @property
    def scopes(self) -> frozenset[str]: ...


class Caller(Protocol):
    """The connection a request came on: its id, its subscriptions, its grant, a way to answer."""

    @property
    def conn_id(self) -> ConnId: ...
    @property
    def subscribed(self) -> set[SessionKey]: ...
    @property
    def grant(self) -> Scoped | None: ...

    def respond(self, req_id: str, payload: Any) -> None: ...


Handler = Callable[[Core, Caller, str, Any], Awaitable[Any]]

__all__ = ["Caller", "Core", "Handler", "Scoped"]
