"""Redis helpers for tests and benchmarks that give a gateway a private key prefix."""

from __future__ import annotations

import redis.asyncio as aioredis


async def drop_redis_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under `prefix:` (a test's or a benchmark's private key space on a
    shared Redis); returns how many were deleted."""
    client = aioredis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await client.unlink(*batch)
                batch = []
        if batch:
            deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted
