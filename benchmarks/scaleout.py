"""Runs/s with 1, 2 and 3 gateway processes on Redis versus one on SQLite, same workload.

    .venv/bin/python benchmarks/scaleout.py --runs 6000 --concurrency 256
    .venv/bin/python benchmarks/scaleout.py --runs 10000 --processes 1   # SQLite x1 and Redis x1 only

Each configuration starts its gateway processes (scripted provider, separate state
dirs, a private Redis key prefix), spreads the runs over them round-robin from this
process (uvloop, 4 connections per gateway) and measures completed runs per second.
Writes benchmarks/out/scaleout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from clawgate.client import Client
from clawgate.testing import GatewayProcess, astart_all, stop_all


async def drive(urls: list[str], runs: int, concurrency: int, tag: str) -> dict[str, Any]:
    clients = [Client(u, max_reconnect_attempts=2) for u in urls for _ in range(4)]
    for c in clients:
        await c.connect()
    counter = iter(range(runs))
    statuses: dict[str, int] = {}

    async def worker(w: int) -> None:
        for i in counter:
            c = clients[i % len(clients)]
            res = await c.run_agent(
                f"bench {i}", session_key=f"agent:main:{tag}{i}", idempotency_key=f"{tag}-{i}"
            )
            statuses[res["status"]] = statuses.get(res["status"], 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    for c in clients:
        await c.close()
    return {"wall_s": round(wall, 3), "runs_per_s": round(runs / wall, 1), "statuses": statuses}


async def configuration(
    name: str, n: int, store: str, runs: int, concurrency: int, redis_url: str
) -> dict[str, Any]:
    prefix = f"cgbench:{uuid.uuid4().hex[:8]}"
    tmp = tempfile.TemporaryDirectory(prefix="clawgate-scale-")
    gateways = [
        GatewayProcess(
            Path(tmp.name) / f"gw{i}",
            args=["--log-level", "warning"],
            settings={"store": store, "redis_prefix": prefix},
            log_path=Path(tmp.name) / f"gw{i}.log",
        )
        for i in range(n)
    ]
    try:
        await astart_all(gateways, timeout_s=30)
        urls = [gp.url for gp in gateways]
        await drive(urls, min(1000, runs), concurrency, f"warm{uuid.uuid4().hex[:4]}")
        result = await drive(urls, runs, concurrency, f"run{uuid.uuid4().hex[:4]}")
    finally:
        await asyncio.to_thread(stop_all, gateways)
        if store != "sqlite":
            r = aioredis.from_url(redis_url)
            keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await r.delete(*keys)
            await r.aclose()
        tmp.cleanup()
    result.update({"config": name, "processes": n, "store": "sqlite" if store == "sqlite" else "redis"})
    print(
        f"{name:>14}: {result['runs_per_s']:>8,.0f} runs/s  ({runs} runs in {result['wall_s']} s) {result['statuses']}",
        flush=True,
    )
    return result


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", default="benchmarks/out/scaleout.json")
    ap.add_argument(
        "--processes", default="1,2,3", help="the Redis configurations to run, as process counts (e.g. 1)"
    )
    a = ap.parse_args()
    results = [await configuration("sqlite x1", 1, "sqlite", a.runs, a.concurrency, a.redis)]
    for n in (int(p) for p in a.processes.split(",")):
        results.append(await configuration(f"redis x{n}", n, a.redis, a.runs, a.concurrency, a.redis))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": a.runs, "concurrency": a.concurrency, "results": results}, indent=1))  # noqa: ASYNC240 - once, at the end
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
