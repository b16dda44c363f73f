"""The I/O edge: WebSocket connections, HTTP endpoints, the uvicorn runner."""

from clawgate._lean import import_uvicorn_without_watchfiles

# Before any module of this package imports uvicorn (see clawgate._lean).
import_uvicorn_without_watchfiles()
