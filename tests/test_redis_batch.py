"""RedisBatcher (store/redis_batch.py) against the real Redis: calls of one loop turn share
one pipeline, each call gets its own replies or error, scripts survive a script cache that
does not know them, a cancelled caller's call is never sent, and a dead server fails
calls instead of hanging them."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from clawgate.store.redis_batch import RedisBatcher
from conftest import unique_prefix

pytestmark = pytest.mark.redis


def first(replies: list[Any]) -> Any:
    return replies[0]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.from_url(redis_url)
    yield c
    await c.aclose()


async def test_calls_of_one_loop_turn_share_one_pipeline_and_keep_their_replies(
    client: aioredis.Redis,
) -> None:
    p = unique_prefix()
    b = RedisBatcher(client, timeout_s=5)
    try:
        await b.submit([("HSET", f"{p}:h", "a", "1", "b", "2")], first)
        before = b.pipelines
        futs = [b.submit([("INCR", f"{p}:n")], first) for _ in range(50)]
        futs.append(b.submit([("HGETALL", f"{p}:h"), ("GET", f"{p}:missing")], lambda r: r))
        got = await asyncio.gather(*futs)
        assert b.pipelines == before + 1  # 51 calls, one send and one read pass
        assert got[:50] == list(range(1, 51))  # sent in the order submitted
        # redis-py's response callback for HGETALL applies, as with Redis.execute_command
        assert got[50] == [{b"a": b"1", b"b": b"2"}, None]
    finally:
        await b.close()
        await client.delete(f"{p}:h", f"{p}:n")


async def test_an_error_reply_fails_its_own_call_only(client: aioredis.Redis) -> None:
    p = unique_prefix()
    b = RedisBatcher(client, timeout_s=5)
    try:
        await b.submit([("SET", f"{p}:s", "text")], first)
        ok1 = b.submit([("GET", f"{p}:s")], first)
        bad = b.submit([("INCR", f"{p}:s")], first)  # not an integer
        ok2 = b.submit([("STRLEN", f"{p}:s")], first)
        assert await ok1 == b"text"
        with pytest.raises(ResponseError, match="not an integer"):
            await bad
        assert await ok2 == 4
    finally:
        await b.close()
        await client.delete(f"{p}:s")


async def test_a_script_redis_does_not_know_is_loaded_and_the_call_retried(client: aioredis.Redis) -> None:
    # A source nobody loaded before (as after a Redis restart or SCRIPT FLUSH): the first
    # EVALSHA gets NOSCRIPT, the batcher loads the script and sends the call again.
    b = RedisBatcher(client, timeout_s=5)
    script = b.script(f"-- {uuid.uuid4().hex}\nreturn tonumber(ARGV[1]) + #KEYS")
    try:
        assert await b.submit([script(keys=["k1", "k2"], args=[40])], first) == 42
        assert b.script_loads == 1
        assert await b.submit([script(keys=["k1"], args=[1])], first) == 2
        assert b.script_loads == 1  # known from now on
    finally:
        await b.close()


async def test_a_cancelled_callers_call_is_not_sent(client: aioredis.Redis) -> None:
    p = unique_prefix()
    b = RedisBatcher(client, timeout_s=5)
    try:
        fut = b.submit([("INCR", f"{p}:n")], first)
        fut.cancel()
        assert await b.submit([("GET", f"{p}:n")], first) is None
    finally:
        await b.close()
        await client.delete(f"{p}:n")


async def test_a_server_that_is_gone_fails_the_calls_and_a_closed_batcher_refuses_new_ones() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    b = RedisBatcher(dead, timeout_s=5)
    try:
        with pytest.raises(RedisConnectionError):
            await b.submit([("PING",)], first)
        with pytest.raises(RedisConnectionError):
            await b.submit([("PING",)], first)  # still answers: the task is alive
    finally:
        await b.close()
        await dead.aclose()
    with pytest.raises(Exception, match="closed"):
        await b.submit([("PING",)], first)
