"""The one exception tree of clawgate.

    ClawgateError                  base; `code` is the wire error code
    ├── InvalidRequest             INVALID_REQUEST: malformed frame, unknown method, bad params
    │   └── PayloadTooLarge        frame over maxPayload (connection closes with 1009)
    ├── Unauthorized               UNAUTHORIZED: bad or missing token, bad device signature
    ├── Forbidden                  FORBIDDEN: a scope or a limit refuses the request
    ├── NotFound                   NOT_FOUND: unknown or expired run / session
    ├── Unavailable                UNAVAILABLE: overloaded or shutting down (retryable)
    │   ├── StoreError             the store failed (UNAVAILABLE on the wire, retryable)
    │   └── TooManyAttempts        HTTP API: too many failed authentications (429, Retry-After)
    ├── AgentTimeout               AGENT_TIMEOUT
    ├── Internal                   INTERNAL: a bug; logged with a correlation id
    ├── RunFailed                  HTTP API (OpenAI routes): the run ended error/timeout/aborted (502)
    └── ProviderError              the LLM provider failed (ends the run as `error`; `kind` names
                                   the failure for retries, counters and the circuit breaker)

Every protocol-facing error knows its wire code and whether it is retryable, so
one place (`to_error_shape`) maps exceptions to error frames.
"""

from __future__ import annotations

import uuid
from typing import Any

from clawgate.protocol.constants import (
    AGENT_TIMEOUT,
    FORBIDDEN,
    INTERNAL,
    INVALID_REQUEST,
    NOT_FOUND,
    RUN_FAILED,
    UNAUTHORIZED,
    UNAVAILABLE,
)


class ClawgateError(Exception):
    code: str = INTERNAL
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after_ms = retry_after_ms

    def to_error_shape(self) -> dict[str, Any]:
        shape: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            shape["details"] = self.details
        if self.retryable:
            shape["retryable"] = True
            if self.retry_after_ms is not None:
                shape["retryAfterMs"] = self.retry_after_ms
        return shape


class InvalidRequest(ClawgateError):
    code = INVALID_REQUEST


class PayloadTooLarge(InvalidRequest):
    pass


class Unauthorized(ClawgateError):
    code = UNAUTHORIZED


class Forbidden(ClawgateError):
    code = FORBIDDEN


class NotFound(ClawgateError):
    code = NOT_FOUND


class Unavailable(ClawgateError):
    code = UNAVAILABLE
    retryable = True

    def __init__(self, message: str, *, retry_after_ms: int = 1000, details: dict[str, Any] | None = None):
        super().__init__(message, details=details, retry_after_ms=retry_after_ms)


class AgentTimeout(ClawgateError):
    code = AGENT_TIMEOUT


class Internal(ClawgateError):
    code = INTERNAL


def internal_error(
    exc: BaseException, log: Any, event: str, *, id_in_message: bool = False, **fields: Any
) -> Internal:
    """The answer to a bug met while serving a request, logged with its traceback.

    A fresh correlation id ties the answer to the log line: in `details.correlationId` (the
    WebSocket protocol), or in the message itself (`id_in_message`, the HTTP API). Call it
    from the `except` block that caught `exc`.
    """
    correlation = uuid.uuid4().hex[:12]
    log.exception(event, correlation_id=correlation, **fields)
    if id_in_message:
        return Internal(f"internal error (correlation id {correlation})")
    return Internal(f"internal error ({type(exc).__name__})", details={"correlationId": correlation})


class StoreError(Unavailable):
    pass


class TooManyAttempts(Unavailable):
    """Too many failed HTTP authentications from one address: 429 with Retry-After."""


class RunFailed(ClawgateError):
    """An OpenAI-compatible request whose run ended error / timeout / aborted: an upstream
    failure for that client (502), with the run's status and error."""

    code = RUN_FAILED


class ProviderError(ClawgateError):
    """The provider failed. `retryable` errors may be retried by the agent loop.

    `kind` names the failure for counters and the circuit breaker: `rate_limit` (429),
    `overloaded` (529/503), `server` (other 5xx), `connection`, `timeout`, `stream_cut` (the
    stream stopped halfway), `circuit_open`, `bad_request` or `error`. `retry_after_s` is the
    provider's Retry-After, honoured by the backoff.
    """

    code = INTERNAL

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        kind: str = "error",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind
        self.retry_after_s = retry_after_s
