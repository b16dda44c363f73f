"""What every HTTP API route shares: bounded body reading, bearer auth, error mapping, run start.

The HTTP routes are adapters over the same run service as the WebSocket methods: a run started
here is accepted, queued, deduplicated, admitted and retained exactly like one started by `agent`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse

from clawgate.errors import ClawgateError, InvalidRequest, PayloadTooLarge, TooManyAttempts, Unauthorized
from clawgate.ids import RunId, SessionKey
from clawgate.protocol.constants import (
    AGENT_TIMEOUT,
    FORBIDDEN,
    INTERNAL,
    INVALID_REQUEST,
    NOT_FOUND,
    READ,
    RUN_FAILED,
    UNAUTHORIZED,
    UNAVAILABLE,
    WRITE,
)
from clawgate.protocol.frames import decode_params
from clawgate.runs.service import Run, SubmitRequest
from clawgate.server.auth import Grant, check_token, require
from clawgate.server.authlimit import peer_key
from clawgate.server.gateway import Gateway
from clawgate.sessions.keys import agent_id_of
from clawgate.settings import Settings, is_loopback
from clawgate.state.clock import Clock
from clawgate.store.records import RunRecord

P = TypeVar("P")

# The WS protocol's error codes as HTTP statuses.
HTTP_STATUS = {
    INVALID_REQUEST: 400,
    UNAUTHORIZED: 401,
    FORBIDDEN: 403,
    NOT_FOUND: 404,
    UNAVAILABLE: 503,
    AGENT_TIMEOUT: 504,
    RUN_FAILED: 502,
    INTERNAL: 500,
}
TOO_MANY = 429
REQUEST_TIMEOUT = 408


class BodyTimeout(InvalidRequest):
    """The request body did not arrive whole within `http_body_timeout_s` (HTTP 408)."""


@dataclass(frozen=True)
class BodyLimits:
    """How large a request body may be, and how long it may take to arrive (on `clock`)."""

    max_bytes: int
    timeout_s: float
    clock: Clock

    @classmethod
    def of(cls, settings: Settings, clock: Clock) -> BodyLimits:
        return cls(settings.max_payload_bytes, settings.http_body_timeout_s, clock)


async def read_body(request: Request, limits: BodyLimits) -> bytes:
    """The request body, refused past `limits.max_bytes` before it is read whole, and
    refused (408) when it has not arrived within `limits.timeout_s`."""
    max_bytes = limits.max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(
            f"body of {declared} bytes exceeds maxPayload {max_bytes}",
            details={"maxPayload": max_bytes, "size": int(declared)},
        )
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    # The timer can only fire while this task waits for the next chunk, inside the `try`.
    timer = limits.clock.call_later(limits.timeout_s, expire)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(
                    f"body exceeds maxPayload {max_bytes}", details={"maxPayload": max_bytes}
                )
            chunks.append(chunk)
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:  # this timer's cancellation, nobody else's
            raise BodyTimeout(
                f"request body not received within {limits.timeout_s:g} s",
                details={"httpBodyTimeoutS": limits.timeout_s, "received": size},
            ) from None
        raise
    finally:
        timer.cancel()
    return b"".join(chunks)


async def read_json(request: Request, limits: BodyLimits, schema: type[P]) -> P:
    body = await read_body(request, limits)
    if not body.strip():
        body = b"{}"
    try:
        return decode_params(msgspec.Raw(body), schema)
    except InvalidRequest as exc:
        # The WS decoder names fields from the frame (`params.x`); an HTTP body is the params.
        field = (exc.details or {}).get("field")
        if isinstance(field, str) and field.startswith("params."):
            exc.details = {**(exc.details or {}), "field": field.removeprefix("params.")}
        raise


def bearer(request: Request, *extra_headers: str) -> str | None:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    for name in extra_headers:
        value = request.headers.get(name)
        if value:
            return value.strip()
    return None


def peer_of(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


@dataclass
class HttpAuth:
    """Bearer-token auth for the HTTP API: the gateway's credentials (a named token's scope
    ceiling is the grant) and the same per-address failed-auth limit as the WebSocket handshake."""

    gateway: Gateway

    def check(
        self, request: Request, needed: str, *, hooks: bool = False, header_names: tuple[str, ...] = ()
    ) -> Grant:
        """The grant of the request's bearer token; raises Unauthorized / Forbidden / TooManyAttempts."""
        gw = self.gateway
        presented = bearer(request, *header_names)
        peer = peer_of(request)
        # Loopback is exempt (a local process can read the token anyway), except for requests a
        # browser makes on behalf of a web page: those carry an Origin.
        limited = not is_loopback(peer) or "origin" in request.headers
        key = peer_key(peer)
        if limited:
            wait_s = gw.auth_limiter.retry_after_s(key)
            if wait_s is not None:
                raise TooManyAttempts(
                    "too many failed authentication attempts from this address",
                    retry_after_ms=math.ceil(wait_s * 1000),
                )
        try:
            if hooks:
                grant = self._hooks_grant(presented)
            else:
                method, ceiling, name = check_token(gw.credentials, presented)
                grant = Grant(protocol=4, role="operator", scopes=ceiling, method=method, credential=name)
        except Unauthorized:
            if limited:
                gw.auth_limiter.failed(key)
            raise
        require(grant, needed, f"{request.method} {request.url.path}")
        return grant

    def _hooks_grant(self, presented: str | None) -> Grant:
        token = self.gateway.settings.hooks_token
        assert token is not None
        if presented is None or not hmac.compare_digest(
            hashlib.sha256(token.encode()).digest(), hashlib.sha256(presented.encode()).digest()
        ):
            raise Unauthorized("missing or invalid hooks token")
        # A hooks token starts runs and nothing else: write, never admin.
        return Grant(
            protocol=4, role="operator", scopes=frozenset({READ, WRITE}), method="token", credential="hooks"
        )


def error_response(exc: ClawgateError, *, openai: bool = False) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, TooManyAttempts):
        status = TOO_MANY
    elif isinstance(exc, BodyTimeout):
        status = REQUEST_TIMEOUT
        headers["connection"] = "close"  # the rest of the body is not waited for on this socket
    else:
        status = HTTP_STATUS.get(exc.code, 500)
    if exc.retryable and exc.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
    if openai:
        body: dict[str, Any] = {
            "error": {
                "message": exc.message,
                "type": _openai_type(status),
                "code": exc.code.lower(),
                "param": (exc.details or {}).get("field"),
            }
        }
    else:
        body = {"ok": False, "error": exc.to_error_shape()}
    return JSONResponse(body, status_code=status, headers=headers)


def _openai_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "service_unavailable",
    }.get(status, "api_error")


@dataclass
class RunStart:
    message: str
    session_key: SessionKey
    agent_id: str
    run_id: RunId
    model: str | None = None
    timeout_s: float | None = None
    extra_system_prompt: str | None = None
    owner: str | None = None
    webhook: str | None = None


async def start_run(gw: Gateway, start: RunStart) -> tuple[Run | None, RunRecord]:
    """Accept a run through the shared run service (admission, dedupe, durability)."""
    gw.admission.check()
    run, rec, _created = await gw.runs.submit(
        SubmitRequest(
            run_id=start.run_id,
            session_key=start.session_key,
            agent_id=start.agent_id,
            message=start.message,
            model=start.model,
            timeout_s=start.timeout_s,
            extra_system_prompt=start.extra_system_prompt,
            owner=None,
            webhook=start.webhook,
        )
    )
    return run, rec


def new_run_id(request: Request, body_key: str | None = None) -> RunId:
    """`Idempotency-Key` header, else the body's key, else a fresh id (same key space as `idempotencyKey`)."""
    key = request.headers.get("idempotency-key") or body_key
    if key is not None:
        if not 0 < len(key) <= 256:
            raise InvalidRequest(
                "Idempotency-Key must be 1 to 256 characters", details={"field": "Idempotency-Key"}
            )
        return RunId(key)
    return RunId(uuid.uuid4().hex)


def default_session(agent_id: str, kind: str) -> SessionKey:
    return SessionKey(f"agent:{agent_id}:{kind}:{uuid.uuid4().hex}")


def session_agent(key: str | None, agent_id: str | None) -> tuple[SessionKey, str]:
    """Resolve (sessionKey, agentId) the way `agent` does."""
    if key is None:
        agent = agent_id or "main"
        return SessionKey(f"agent:{agent}:main"), agent
    return SessionKey(key), agent_id or agent_id_of(SessionKey(key))
