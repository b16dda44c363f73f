"""Runs/s of a batch with and without 100 connections subscribed to every event.

Starts one gateway (SQLite, scripted provider, `main_concurrency=64`), runs a batch
of N runs (256 in flight over 4 connections) with no subscriber, then starts a
second process holding S WebSocket connections that each sent
`events.subscribe {all: true}` and read every frame (counted, not decoded), and
runs the same batch again. Prints runs/s and gateway CPU-us per run for both, the
frames the subscribers received and how many were dropped as slow consumers.

    .venv/bin/python benchmarks/fanout.py                      # N = 10,000, S = 100

The subscriber process shares the machine's cores with the gateway and the
driver, so on a small machine part of the difference is the subscribers' own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs_throughput import cpu_s, drive, start_gateway

ROOT = Path(__file__).resolve().parent
CONNECT = {
    "minProtocol": 3,
    "maxProtocol": 4,
    "client": {"id": "fanout", "version": "1", "platform": "python", "mode": "cli"},
    "role": "operator",
    "scopes": ["operator.read"],
}


async def subscribe_and_count(url: str, n: int) -> None:
    """Subscriber process: S connections, counts frames until SIGTERM, then prints JSON."""
    frames = [0] * n
    closed = [False] * n
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    # At most 16 handshakes at once: the gateway refuses more than `max_pending_handshakes_per_addr`
    # (32) unfinished handshakes from one address, and all of these come from 127.0.0.1.
    handshakes = asyncio.Semaphore(16)

    async def one(i: int, ready: asyncio.Event) -> None:
        async with handshakes:
            ws = await websockets.connect(url, ping_interval=None, max_size=None, compression=None)
            await ws.recv()  # challenge
            await ws.send(json.dumps({"type": "req", "id": "c", "method": "connect", "params": CONNECT}))
            await ws.recv()
            await ws.send(
                json.dumps({"type": "req", "id": "s", "method": "events.subscribe", "params": {"all": True}})
            )
            await ws.recv()
        ready.set()
        try:
            async for _ in ws:
                frames[i] += 1
        except websockets.exceptions.ConnectionClosed:
            pass
        closed[i] = True

    readies = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(one(i, readies[i])) for i in range(n)]
    for task, ready in zip(tasks, readies, strict=True):
        # A connection that failed to subscribe ends the process (its parent sees it) instead
        # of leaving it waiting for a "ready" that never comes.
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            raise SystemExit(f"subscriber connection failed: {task.exception()!r}")
    print("ready", flush=True)
    await stop.wait()
    # Read what is still in flight (socket buffers, the gateway's send buffers) before counting.
    last = -1
    while sum(frames) != last:
        last = sum(frames)
        await asyncio.sleep(1.0)
    for t in tasks:
        t.cancel()
    print(
        json.dumps({"frames": sum(frames), "dropped": sum(closed), "per_conn_min": min(frames)}), flush=True
    )


def batch(url: str, runs: int, gw: psutil.Process) -> dict[str, Any]:
    cpu0 = cpu_s(gw)
    samples, wall = asyncio.run(
        drive(
            url,
            runs=runs,
            concurrency=256,
            connections=4,
            sessions=0,
            message="fan-out run",
            tag=uuid.uuid4().hex[:8],
        )
    )
    cpu = cpu_s(gw) - cpu0
    done = len(samples.final_ms)
    return {
        "completed": done,
        "errors": len(samples.errors),
        "runs_per_s": round(done / wall, 1),
        "gateway_cpu_us_per_run": round(cpu / max(done, 1) * 1e6, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--subscribe", default=None, help=argparse.SUPPRESS)  # subscriber process mode
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "fanout.json")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    if args.subscribe:
        asyncio.run(subscribe_and_count(args.subscribe, args.subscribers))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="clawgate-fanout-"))
    gateway = start_gateway(
        tmp / "state", ["main_concurrency=64", "rate_limit_per_s=100000"], tmp / "gateway.log"
    )
    gw = psutil.Process(gateway.pid)
    url = gateway.url
    try:
        asyncio.run(
            drive(url, runs=1000, concurrency=256, connections=4, sessions=0, message="warm", tag="w")
        )
        plain = batch(url, args.runs, gw)
        sub = subprocess.Popen(
            [sys.executable, __file__, "--subscribe", url, "--subscribers", str(args.subscribers)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "ready":
            raise SystemExit("subscribers did not start")
        subscribed = batch(url, args.runs, gw)
        time.sleep(1.0)  # let the subscribers read the tail
        sub.send_signal(signal.SIGTERM)
        counts = json.loads(sub.stdout.readline())
        sub.wait(timeout=30)
    finally:
        gateway.stop()
    result = {
        "runs": args.runs,
        "subscribers": args.subscribers,
        "without": plain,
        "with": subscribed,
        "subscriber_frames": counts,
        "ratio": round(subscribed["runs_per_s"] / plain["runs_per_s"], 3),
        "load_avg": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"without subscribers  {plain['runs_per_s']:,.1f} runs/s, gateway {plain['gateway_cpu_us_per_run']} us/run"
    )
    print(
        f"with {args.subscribers} subscribers {subscribed['runs_per_s']:,.1f} runs/s, "
        f"gateway {subscribed['gateway_cpu_us_per_run']} us/run  (ratio {result['ratio']})"
    )
    print(
        f"subscriber frames   {counts['frames']:,} received, {counts['dropped']} connections dropped, "
        f"fewest on one connection {counts['per_conn_min']:,}"
    )
    print(f"load avg            {result['load_avg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
