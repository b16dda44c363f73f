"""RSS per queued run: N runs accepted and queued behind a stalled provider.

Starts one gateway (SQLite, scripted provider, `main_concurrency=1`), sends a first
run whose reply is `[[stall]]` so it holds the only slot, warms up, then queues N
more runs with `chat.send` (accepted and stored, not started) and reads the
gateway's RSS (psutil) before and after. Two layouts: every run in its own
session (one session lane each, the worst case) and all runs in one session.

    .venv/bin/python benchmarks/queued_memory.py               # N = 20,000
    .venv/bin/python benchmarks/queued_memory.py --runs 50000

Writes benchmarks/out/queued_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from clawgate.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs_throughput import start_gateway

ROOT = Path(__file__).resolve().parent


async def queue_runs(url: str, runs: int, *, tag: str, one_session: bool) -> None:
    clients = [Client(url, keep_events=False, max_reconnect_attempts=3) for _ in range(4)]
    for c in clients:
        await c.connect()
    counter = iter(range(runs))

    async def worker(client: Client) -> None:
        for i in counter:
            key = f"agent:main:q-{tag}" if one_session else f"agent:main:q-{tag}-{i}"
            await client.call(
                "chat.send", {"sessionKey": key, "message": "queued", "idempotencyKey": f"q-{tag}-{i}"}
            )

    await asyncio.gather(*(worker(clients[w % 4]) for w in range(64)))
    for c in clients:
        await c.close()


async def stall_slot(url: str) -> None:
    async with Client(url) as c:
        await c.call(
            "chat.send",
            {"sessionKey": "agent:main:staller", "message": "[[stall]]", "idempotencyKey": "stall"},
        )


def measure(runs: int, warmup: int, one_session: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="clawgate-qmem-"))
    gateway = start_gateway(
        tmp / "state",
        ["main_concurrency=1", f"max_tracked_runs={runs + warmup + 100}", "rate_limit_per_s=100000"],
        tmp / "gateway.log",
    )
    gw = psutil.Process(gateway.pid)
    url = gateway.url
    try:
        asyncio.run(stall_slot(url))
        asyncio.run(queue_runs(url, warmup, tag="warm", one_session=one_session))
        time.sleep(1.0)
        before = gw.memory_info().rss
        asyncio.run(queue_runs(url, runs, tag="main", one_session=one_session))
        time.sleep(1.0)
        after = gw.memory_info().rss
    finally:
        gateway.stop()
    return {
        "layout": "one session" if one_session else "one session per run",
        "runs": runs,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_run": round((after - before) / runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "queued_memory.json")
    args = parser.parse_args()
    results = [measure(args.runs, args.warmup, one) for one in (False, True)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "load_avg": os.getloadavg()}, indent=2) + "\n")
    for r in results:
        print(
            f"{r['layout']:<22} {r['runs']:,} queued: RSS {r['rss_before'] / 2**20:.1f} -> "
            f"{r['rss_after'] / 2**20:.1f} MB, {r['bytes_per_run']:,} bytes per queued run"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
