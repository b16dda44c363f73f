"""Handshake decisions: protocol negotiation, token check, scopes (pure; no sockets)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from clawgate.errors import Forbidden, InvalidRequest, Unauthorized
from clawgate.protocol.schemas import ConnectParams

SUPPORTED_PROTOCOLS = (3, 4)
READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"
SCOPE_RANK = {READ: 1, WRITE: 2, ADMIN: 3}
ALL_SCOPES = (READ, WRITE, ADMIN)


@dataclass(frozen=True)
class Grant:
    protocol: int
    role: str
    scopes: frozenset[str]
    method: str  # "token" | "none"

    def allows(self, needed: str) -> bool:
        rank = SCOPE_RANK[needed]
        return any(SCOPE_RANK.get(s, 0) >= rank for s in self.scopes)


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


def check_token(configured: str | None, presented: str | None) -> str:
    """Constant-time token comparison. Returns the auth method used."""
    if configured is None:
        return "none"
    if presented is None:
        raise Unauthorized("this gateway requires a token (auth.token)")
    if not hmac.compare_digest(configured.encode("utf-8"), presented.encode("utf-8")):
        raise Unauthorized("invalid token")
    return "token"


def expand(scopes: list[str] | None) -> frozenset[str]:
    """What a client asked for; a higher scope implies the lower ones. No list means all of them."""
    if scopes is None:
        return frozenset(ALL_SCOPES)
    unknown = [s for s in scopes if s not in SCOPE_RANK]
    known = [s for s in scopes if s in SCOPE_RANK]
    if unknown and not known:
        raise InvalidRequest(f"unknown scopes: {unknown}", details={"field": "params.scopes"})
    top = max((SCOPE_RANK[s] for s in known), default=0)
    return frozenset(s for s, r in SCOPE_RANK.items() if r <= top)


def authorize(params: ConnectParams, configured_token: str | None) -> Grant:
    protocol = negotiate(params.min_protocol, params.max_protocol)
    method = check_token(configured_token, params.auth.token if params.auth else None)
    if params.role not in ("operator", "node"):
        raise InvalidRequest(f"unknown role {params.role!r}", details={"field": "params.role"})
    return Grant(protocol=protocol, role=params.role, scopes=expand(params.scopes), method=method)


def require(grant: Grant, scope: str, method: str) -> None:
    if not grant.allows(scope):
        # OpenClaw's detail fields (code, missingScope, requiredScopes) plus ours (scope, method).
        raise Forbidden(
            f"missing scope: {scope} ({method})",
            details={
                "code": "MISSING_SCOPE",
                "missingScope": scope,
                "requiredScopes": [scope],
                "scope": scope,
                "method": method,
            },
        )
