"""A small synchronous wrapper for scripts: each call runs on a private event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from clawgate.client.client import Client

T = TypeVar("T")


class SyncClient:
    def __init__(self, url: str = "ws://127.0.0.1:18789/", **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="clawgate-sync", daemon=True)
        self._thread.start()
        self._client = Client(url, **kw)
        self._run(self._client.connect())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._run(self._client.call(method, params))

    def run_agent(self, message: str, **kw: Any) -> dict[str, Any]:
        return self._run(self._client.run_agent(message, **kw))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
