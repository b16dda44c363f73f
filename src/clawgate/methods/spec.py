"""One method's entry in the table: name, params schema, required scope, handler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clawgate.methods.context import Handler


class Deferred:
    """Returned by handlers that send their responses themselves (e.g. `agent`'s two answers)."""


DEFERRED = Deferred()


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[Any]
    scope: str
    handler: Handler


__all__ = ["DEFERRED", "Deferred", "Handler", "MethodSpec"]
