"""The wire vocabulary shared by the server, the methods, the store and the clients.

Scopes and their order, run statuses, the error of a run a restart interrupted, the
error codes and the WebSocket close codes: each defined here once and imported
everywhere else.
"""

from __future__ import annotations

from typing import Final, Literal

# -- scopes ------------------------------------------------------------------------------------
READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"
SCOPE_NAMES = (READ, WRITE, ADMIN)
# A higher scope implies the lower ones.
SCOPE_RANK = {READ: 1, WRITE: 2, ADMIN: 3}

# -- runs ----------------------------------------------------------------------------------------
RunStatus = Literal["queued", "running", "ok", "error", "timeout", "aborted"]
FINAL_STATUSES: frozenset[str] = frozenset({"ok", "error", "timeout", "aborted"})
# The error of a run that was in flight when its gateway stopped or died.
INTERRUPTED: Final = "interrupted by gateway restart"

# -- error codes (`error.code` of a response frame) -------------------------------------------------
INVALID_REQUEST: Final = "INVALID_REQUEST"
UNAUTHORIZED: Final = "UNAUTHORIZED"
FORBIDDEN: Final = "FORBIDDEN"
NOT_FOUND: Final = "NOT_FOUND"
UNAVAILABLE: Final = "UNAVAILABLE"
AGENT_TIMEOUT: Final = "AGENT_TIMEOUT"
INTERNAL: Final = "INTERNAL"
# HTTP API only (OpenAI routes): the run ended error / timeout / aborted.
RUN_FAILED: Final = "RUN_FAILED"

# -- WebSocket close codes (RFC 6455 section 7.4.1) ---------------------------------------------------
CLOSE_GOING_AWAY: Final = 1001  # the peer goes away
CLOSE_POLICY: Final = 1008  # handshake failed or timed out, slow consumer
CLOSE_TOO_BIG: Final = 1009  # a frame over maxPayload
CLOSE_RESTART: Final = 1012  # the gateway is stopping (service restart)
CLOSE_TRY_LATER: Final = 1013  # refused for now (limits, stopping): retryable
