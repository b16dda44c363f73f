"""Handshake decisions: protocol negotiation, token check, scopes (pure; no sockets)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from clawgate.clip import clip
from clawgate.errors import Forbidden, InvalidRequest, Unauthorized
from clawgate.protocol.constants import READ, SCOPE_NAMES, SCOPE_RANK
from clawgate.protocol.schemas import ConnectParams
from clawgate.server.credentials import ALL_SCOPES as EVERY_SCOPE
from clawgate.server.credentials import Credentials

SUPPORTED_PROTOCOLS = (3, 4)
ALL_SCOPES = SCOPE_NAMES


@dataclass(frozen=True)
class Grant:
    protocol: int
    role: str
    scopes: frozenset[str]
    method: str  # "token" | "none"
    credential: str | None = None  # the matching token's name (None without a token)

    def allows(self, needed: str) -> bool:
        return SCOPE_RANK[needed] <= self.top_rank

    @functools.cached_property
    def top_rank(self) -> int:
        """The highest rank among the granted scopes (checked on every request)."""
        return max((SCOPE_RANK.get(s, 0) for s in self.scopes), default=0)


def negotiate(min_protocol: int, max_protocol: int) -> int:
    if min_protocol > max_protocol:
        raise InvalidRequest(
            "minProtocol is greater than maxProtocol", details={"field": "params.minProtocol"}
        )
    for version in sorted(SUPPORTED_PROTOCOLS, reverse=True):
        if min_protocol <= version <= max_protocol:
            return version
    raise InvalidRequest(
        f"no common protocol version: client speaks {min_protocol}..{max_protocol}, server speaks 3..4",
        details={"field": "params.maxProtocol", "supported": list(SUPPORTED_PROTOCOLS)},
    )


def check_token(credentials: Credentials, presented: str | None) -> tuple[str, frozenset[str], str | None]:
    """Which credential the client holds: (auth method, scope ceiling, credential name)."""
    if not credentials.required:
        return "none", EVERY_SCOPE, None
    if presented is None:
        raise Unauthorized("this gateway requires a token (auth.token)")
    found = credentials.match(presented)
    if found is None:
        raise Unauthorized("invalid token")
    return "token", found.ceiling, found.name


def expand(scopes: list[str] | None) -> frozenset[str]:
    """What a client asked for; a higher scope implies the lower ones.

    No list means read only: a client that does not say what it needs gets the least,
    never admin (a page or script that omits scopes must not be able to delete sessions).
    """
    if scopes is None:
        return frozenset({READ})
    unknown = [s for s in scopes if s not in SCOPE_RANK]
    known = [s for s in scopes if s in SCOPE_RANK]
    if unknown and not known:
        raise InvalidRequest(f"unknown scopes: {clip(unknown)}", details={"field": "params.scopes"})
    top = max((SCOPE_RANK[s] for s in known), default=0)
    return frozenset(s for s, r in SCOPE_RANK.items() if r <= top)


def authorize(params: ConnectParams, credentials: Credentials) -> Grant:
    protocol = negotiate(params.min_protocol, params.max_protocol)
    method, ceiling, name = check_token(credentials, params.auth.token if params.auth else None)
    if params.role not in ("operator", "node"):
        raise InvalidRequest(f"unknown role {clip(params.role)!r}", details={"field": "params.role"})
    asked = expand(params.scopes)
    beyond = asked - ceiling
    if beyond:
        # The highest scope asked for and not allowed, in OpenClaw's MISSING_SCOPE shape.
        missing = max(beyond, key=SCOPE_RANK.__getitem__)
        raise Forbidden(
            f"missing scope: {missing} (this token allows {', '.join(sorted(ceiling)) or 'nothing'})",
            details={
                "code": "MISSING_SCOPE",
                "missingScope": missing,
                "requiredScopes": [missing],
                "scope": missing,
                "method": "connect",
            },
        )
    return Grant(protocol=protocol, role=params.role, scopes=asked, method=method, credential=name)


def require(grant: Grant, scope: str, method: str) -> None:
    if not grant.allows(scope):
        # OpenClaw's detail fields (code, missingScope, requiredScopes) plus ours (scope, method).
        raise Forbidden(
            f"missing scope: {scope} ({clip(method)})",
            details={
                "code": "MISSING_SCOPE",
                "missingScope": scope,
                "requiredScopes": [scope],
                "scope": scope,
                "method": clip(method),
            },
        )
