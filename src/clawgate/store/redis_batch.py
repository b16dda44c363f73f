"""Auto-pipelining on one Redis connection.

A Redis call costs its caller a send and a wake-up for the reply: 30 to 45 µs of a
gateway's CPU on loopback, for a command Redis runs in a microsecond. `RedisBatcher`
sends every call made while it is idle or busy as one pipeline on one connection (the
calls of one loop turn, or everything queued while the previous pipeline was in
flight), so a burst of N calls from N tasks costs one send and one read pass::

    b = RedisBatcher(client, wrap_error=lambda e: StoreError(f"redis: {e}"))
    b.start()
    fut = b.submit([("GET", "k")], lambda replies: replies[0])  # a future, resolved in order
    step = b.script(LUA_SOURCE)
    await b.submit([step(keys=[...], args=[...])], first)        # EVALSHA, loaded on NOSCRIPT
    await b.close()

One call is a list of commands sent one after the other in the same pipeline (they are
not a transaction: wrap them in MULTI/EXEC for one); `parse` turns their replies into the
call's result. Replies get redis-py's response callbacks for the command's name, as
`Redis.execute_command` applies them. An error reply fails its call only; a connection
error, or no answer within `timeout_s` for the whole pipeline (a paused Redis), fails
every call of that pipeline with `wrap_error(exc)` and the next pipeline reconnects.
Connection errors are retried by the client's `Retry` policy like redis-py's own
pipelines. Commands are packed by hiredis (`hiredis.pack_command`) and the replies read
straight from the connection: redis-py's `Pipeline` costs about three times as much CPU
per command.

Scripts (`script`) go as EVALSHA. A call made of one EVALSHA whose script Redis does not
know (NOSCRIPT: Redis restarted, or SCRIPT FLUSH) is retried once after SCRIPT LOAD.

Order: calls are sent in the order they were submitted, so two calls of one task keep
their order even when the task does not await the first. Never submit a blocking command
(BLPOP, XREAD BLOCK): it would hold every call behind it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from clawgate.store.base import settle_exception, settle_result

log = structlog.get_logger("clawgate.store.redis_batch")
T = TypeVar("T")

Cmd = tuple[str | bytes | int | float, ...]
Parse = Callable[[list[Any]], Any]


class _Call:
    __slots__ = ("cmds", "fut", "parse")

    def __init__(self, cmds: Sequence[Cmd], parse: Parse, fut: asyncio.Future[Any]):
        self.cmds = cmds
        self.parse = parse
        self.fut = fut


class BatchScript:
    """A Lua script sent by its SHA1: `script(keys=[...], args=[...])` is one EVALSHA command."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(self, keys: Sequence[str] = (), args: Iterable[str | bytes | int | float] = ()) -> Cmd:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


def _identity(exc: BaseException) -> BaseException:
    return exc


class RedisBatcher:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        timeout_s: float,
        batch_max: int = 512,
        wrap_error: Callable[[BaseException], BaseException] = _identity,
        on_outcome: Callable[[BaseException | None], None] | None = None,
        name: str = "clawgate-redis-batcher",
    ) -> None:
        if batch_max < 1 or timeout_s <= 0:
            raise ValueError("batch_max must be >= 1 and timeout_s > 0")
        self.client = client
        self.timeout_s = timeout_s
        self.batch_max = batch_max
        self.wrap_error = wrap_error
        self.on_outcome = on_outcome
        self.name = name
        self._callbacks: dict[str, Callable[..., Any]] = {
            str(k).upper(): v for k, v in client.response_callbacks.items()
        }
        self._scripts: dict[str, str] = {}  # sha -> source, for SCRIPT LOAD on NOSCRIPT
        self._queue: asyncio.Queue[_Call | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        self._closed = False
        # counters
        self.pipelines = 0
        self.calls = 0
        self.script_loads = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def closed(self) -> bool:
        return self._closed

    def script(self, source: str) -> BatchScript:
        s = BatchScript(source)
        self._scripts[s.sha] = source
        return s

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("batcher is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def submit(self, cmds: Sequence[Cmd], parse: Callable[[list[Any]], T]) -> asyncio.Future[T]:
        """Queue one call; its future resolves to `parse(replies)` or fails. Starts the
        sending task on first use."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_exception(self.wrap_error(RedisError("connection batcher is closed")))
            return fut
        if self._task is None:
            self.start()
        self._queue.put_nowait(_Call(cmds, parse, fut))
        return fut

    async def close(self) -> None:
        """Send what is queued, then stop and give the connection back. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and not self._task.done():
            self._queue.put_nowait(None)
            await self._task
        self._fail_queued()
        await self._release()

    async def abort(self) -> None:
        """Stop at once (a crash, in tests): what is queued or in flight fails, nothing more
        is sent, and the connection is dropped, not reused."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_queued()
        await self._release(drop=True)

    def _fail_queued(self) -> None:
        while not self._queue.empty():
            call = self._queue.get_nowait()
            if call is not None:
                settle_exception(call.fut, self.wrap_error(RedisError("connection batcher is closed")))

    async def _release(self, *, drop: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if drop:
            await conn.disconnect()
        await self.client.connection_pool.release(conn)

    # -- the sending task --------------------------------------------------------------------------
    async def _run(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.batch_max:
                try:
                    call = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if call is None:
                    stop = True
                    break
                batch.append(call)
            batch = [call for call in batch if not call.fut.done()]  # a cancelled caller's call is not sent
            if not batch:
                continue
            try:
                await self._execute(batch)
            except asyncio.CancelledError:
                for call in batch:
                    settle_exception(call.fut, self.wrap_error(RedisError("connection batcher is closed")))
                raise

    async def _execute(self, batch: list[_Call], *, retry_noscript: bool = True) -> None:
        cmds = [cmd for call in batch for cmd in call.cmds]
        try:
            async with asyncio.timeout(self.timeout_s):  # a paused Redis: an outage after this
                replies = await self._roundtrip(cmds)
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            await self._drop_connection()
            self._outcome(exc)
            for call in batch:
                settle_exception(call.fut, self.wrap_error(exc))
            return
        except Exception as exc:  # a bug: never leave a caller waiting
            await self._drop_connection()
            log.exception("redis batcher failed", batcher=self.name)
            for call in batch:
                settle_exception(call.fut, self.wrap_error(RedisError(f"redis batcher: {exc!r}")))
            return
        self._outcome(None)
        self.pipelines += 1
        self.calls += len(batch)
        missing: list[_Call] = []
        i = 0
        for call in batch:
            n = len(call.cmds)
            res = replies[i : i + n]
            i += n
            failed = next((r for r in res if isinstance(r, ResponseError)), None)
            if failed is not None:
                if retry_noscript and isinstance(failed, NoScriptError) and n == 1:
                    missing.append(call)
                else:
                    settle_exception(call.fut, self.wrap_error(failed))
                continue
            try:
                value = call.parse(res)
            except Exception as exc:
                settle_exception(call.fut, self.wrap_error(RedisError(f"bad reply: {exc!r}")))
                continue
            settle_result(call.fut, value)
        if missing:
            await self._load_scripts(missing)

    async def _load_scripts(self, calls: list[_Call]) -> None:
        shas = {str(call.cmds[0][1]) for call in calls}
        loads: list[Cmd] = [("SCRIPT", "LOAD", self._scripts[sha]) for sha in shas if sha in self._scripts]
        self.script_loads += len(loads)
        log.info("redis scripts reloaded (NOSCRIPT)", batcher=self.name, scripts=len(loads))
        load = _Call(loads, _ignore, asyncio.get_running_loop().create_future())
        await self._execute([load, *calls], retry_noscript=False)

    async def _roundtrip(self, cmds: list[Cmd]) -> list[Any]:
        if self._conn is None:
            self._conn = await self.client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        conn = self._conn
        data = b"".join([hiredis.pack_command(cmd) for cmd in cmds])  # type: ignore[arg-type]

        async def attempt() -> list[Any]:
            await conn.send_packed_command(data, check_health=False)
            out: list[Any] = []
            for cmd in cmds:
                try:
                    reply = await conn.read_response()
                except ResponseError as exc:
                    out.append(exc)
                    continue
                cb = self._callbacks.get(cmd[0].upper() if isinstance(cmd[0], str) else "")
                out.append(cb(reply) if cb is not None else reply)
            return out

        async def fail(_: Exception) -> None:
            await conn.disconnect()

        result: list[Any] = await conn.retry.call_with_retry(attempt, fail)
        return result

    async def _drop_connection(self) -> None:
        """After a failure the connection may hold replies not read: never reuse it."""
        if self._conn is not None:
            await self._conn.disconnect()

    def _outcome(self, exc: BaseException | None) -> None:
        if self.on_outcome is not None:
            self.on_outcome(exc)


def _ignore(_: list[Any]) -> None:
    return None
