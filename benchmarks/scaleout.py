"""Runs/s with 1, 2 and 3 gateway processes on Redis versus one on SQLite, same workload.

    .venv/bin/python benchmarks/scaleout.py --runs 6000 --concurrency 256
    .venv/bin/python benchmarks/scaleout.py --runs 10000 --processes 1   # SQLite x1 and Redis x1 only
    .venv/bin/python benchmarks/scaleout.py --runs 10000 --processes 1 --repeat 3

Each configuration starts its gateway processes (scripted provider, separate state
dirs, a private Redis key prefix), spreads the runs over them round-robin from this
process (uvloop, 4 connections per gateway) and measures completed runs per second, and
the CPU per run of the gateway processes and of redis-server (its `INFO cpu`, so nothing
else should use that Redis meanwhile) over the measured runs. The load generator shares
the machine's cores, so runs/s moves with whatever else the machine does; CPU per run
moves much less. `--repeat N` runs the configurations N times, alternating, and prints
the medians and each round's Redis x1 / SQLite x1 ratios. Writes
benchmarks/out/scaleout.json.
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

import psutil
import redis.asyncio as aioredis

from clawgate.client import Client
from clawgate.testing import GatewayProcess, astart_all, stop_all
from clawgate.testing.redis import drop_redis_prefix


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
        procs = [psutil.Process(gp.pid) for gp in gateways]
        gw0, redis0 = _cpu_s(procs), await _redis_cpu_s(redis_url)
        result = await drive(urls, runs, concurrency, f"run{uuid.uuid4().hex[:4]}")
        gw_us, redis_us = (
            (_cpu_s(procs) - gw0) / runs * 1e6,
            (await _redis_cpu_s(redis_url) - redis0) / runs * 1e6,
        )
        result["gateway_cpu_us_per_run"] = round(gw_us, 1)
        if store != "sqlite":
            result["redis_cpu_us_per_run"] = round(redis_us, 1)
    finally:
        await asyncio.to_thread(stop_all, gateways)
        if store != "sqlite":
            await drop_redis_prefix(redis_url, prefix)
        tmp.cleanup()
    result.update({"config": name, "processes": n, "store": "sqlite" if store == "sqlite" else "redis"})
    cpu = f"gateway CPU {result['gateway_cpu_us_per_run']:,.0f} us/run"
    if "redis_cpu_us_per_run" in result:
        cpu += f" + redis-server {result['redis_cpu_us_per_run']:,.0f}"
    print(
        f"{name:>14}: {result['runs_per_s']:>8,.0f} runs/s  ({runs} runs in {result['wall_s']} s) {cpu} {result['statuses']}",
        flush=True,
    )
    return result


def _cpu_s(procs: list[psutil.Process]) -> float:
    return float(sum(t.user + t.system for t in (p.cpu_times() for p in procs)))


async def _redis_cpu_s(url: str) -> float:
    r = aioredis.from_url(url)
    try:
        info = await r.info("cpu")
    finally:
        await r.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def summary(rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per configuration: median runs/s and CPU per run over the rounds; per round, the
    Redis x1 / SQLite x1 ratios of runs/s and of CPU per run (gateway + redis-server)."""
    out: dict[str, Any] = {}
    for name in [r["config"] for r in rounds[0]]:
        rows = [r for rnd in rounds for r in rnd if r["config"] == name]
        out[name] = {
            "runs_per_s": _median([r["runs_per_s"] for r in rows]),
            "cpu_us_per_run": _median(
                [r["gateway_cpu_us_per_run"] + r.get("redis_cpu_us_per_run", 0.0) for r in rows]
            ),
        }
    ratios = []
    for rnd in rounds:
        by = {r["config"]: r for r in rnd}
        if "sqlite x1" in by and "redis x1" in by:
            sq, rd = by["sqlite x1"], by["redis x1"]
            ratios.append(
                {
                    "runs_per_s": round(rd["runs_per_s"] / sq["runs_per_s"], 2),
                    # SQLite's CPU per run over Redis's: the runs/s ratio of a CPU-bound machine.
                    "cpu": round(
                        sq["gateway_cpu_us_per_run"]
                        / (rd["gateway_cpu_us_per_run"] + rd["redis_cpu_us_per_run"]),
                        2,
                    ),
                }
            )
    out["redis_x1_over_sqlite_x1"] = ratios
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", default="benchmarks/out/scaleout.json")
    ap.add_argument(
        "--processes", default="1,2,3", help="the Redis configurations to run, as process counts (e.g. 1)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all configurations, alternating")
    a = ap.parse_args()
    rounds: list[list[dict[str, Any]]] = []
    for _ in range(a.repeat):
        results = [await configuration("sqlite x1", 1, "sqlite", a.runs, a.concurrency, a.redis)]
        for n in (int(p) for p in a.processes.split(",")):
            results.append(await configuration(f"redis x{n}", n, a.redis, a.runs, a.concurrency, a.redis))
        rounds.append(results)
    summ = summary(rounds)
    for name, row in summ.items():
        if name != "redis_x1_over_sqlite_x1":
            print(
                f"{name:>14}: median {row['runs_per_s']:,.0f} runs/s, {row['cpu_us_per_run']:,.0f} us of CPU per run"
            )
    for i, ratio in enumerate(summ["redis_x1_over_sqlite_x1"], 1):
        print(
            f"round {i}: redis x1 / sqlite x1 = {ratio['runs_per_s']} (runs/s), {ratio['cpu']} (CPU per run)"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(  # noqa: ASYNC240 - once, at the end
        json.dumps(
            {"runs": a.runs, "concurrency": a.concurrency, "rounds": rounds, "summary": summ}, indent=1
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
