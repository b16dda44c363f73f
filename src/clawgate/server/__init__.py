"""The I/O edge: WebSocket connections, HTTP endpoints, the uvicorn runner."""
