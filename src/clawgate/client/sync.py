"""A small synchronous wrapper for scripts: every call runs on a private event loop thread.

with SyncClient("ws://127.0.0.1:18789/") as c:
    print(c.run_agent("hello", idempotency_key="hello-1")["status"])
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from clawgate.client.client import Client

T = TypeVar("T")


class SyncClient:
    """Blocking facade over `Client`; keyword arguments go to `Client` (token, scopes, ...).

    Errors are the same `ClientError` / `ConnectionLost` the async client raises.
    """

    def __init__(self, url: str = "ws://127.0.0.1:18789/", **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="clawgate-sync", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._client: Client = self._run(self._make(url, kw))
            self.hello: dict[str, Any] = self._run(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _make(url: str, kw: dict[str, Any]) -> Client:
        # Built on the loop thread, so its asyncio primitives belong to that loop.
        return Client(url, **kw)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return its payload (see `Client.call`)."""
        return self._run(self._client.call(method, params))

    def run_agent(self, message: str, **kw: Any) -> dict[str, Any]:
        """Run `agent` to its final payload (see `Client.run_agent`)."""
        return self._run(self._client.run_agent(message, **kw))

    def wait(self, run_id: str, timeout_ms: int = 30_000) -> dict[str, Any]:
        """`agent.wait` (see `Client.wait`)."""
        return self._run(self._client.wait(run_id, timeout_ms))

    def spawn(self, session_key: str, task: str, **kw: Any) -> dict[str, Any]:
        """`sessions.spawn` (see `Client.spawn`)."""
        return self._run(self._client.spawn(session_key, task, **kw))

    def abort(self, run_id: str) -> dict[str, Any]:
        """`agent.abort`."""
        return self._run(self._client.abort(run_id))

    def status(self) -> dict[str, Any]:
        """The gateway's `status`."""
        return self._run(self._client.status())

    def close(self) -> None:
        """Close the connection and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._run(self._client.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
