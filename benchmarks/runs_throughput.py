"""Throughput of completed agent runs through one gateway process (docs/benchmarks.md).

Starts ONE gateway as a separate process (scripted provider, SQLite store in a
temporary state dir, a free port), waits for /healthz, then drives N `agent`
runs at concurrency C from this process over several WebSocket connections
(uvloop). Per run it measures the time to the `accepted` answer and to the
final answer. Prints runs/s, p50/p99 of both, the gateway's RSS (psutil on the
child pid) before and after, and the CPU both processes used; writes JSON.

    .venv/bin/python benchmarks/runs_throughput.py                 # 20,000 runs at 256
    .venv/bin/python benchmarks/runs_throughput.py --runs 5000 --set main_concurrency=64
    # one connection, 256 in flight, with the bare-echo floor measured in the same run:
    .venv/bin/python benchmarks/runs_throughput.py --runs 20000 --connections 1 \
        --set main_concurrency=64 --echo
    # the same with a py-spy flame graph of the gateway (benchmarks/out/, not in git):
    .venv/bin/python benchmarks/runs_throughput.py --runs 20000 --connections 1 \
        --set main_concurrency=64 --profile benchmarks/out/gateway.svg
    # (a .txt name writes collapsed stacks instead: `python benchmarks/stacks.py FILE` sums them)
    # on Redis (a private key prefix, deleted at the end; one given with --set is kept):
    .venv/bin/python benchmarks/runs_throughput.py --runs 8000 --set store=redis://127.0.0.1:6379/0

`--echo` then starts `benchmarks/echo_server.py` and drives it with the same client,
concurrency and connections (one `call` per round trip), so the "echo ratio" (runs/s
over echo round trips/s) and CPU-us per run / per echo come from one invocation. The echo
is the median of three passes of N round trips (each takes about a second).

Target on the 2-core machine: >= 1,000 runs/s, p99 accepted < 20 ms at 256 concurrent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from clawgate.cli.app import parse_sets
from clawgate.client import Client, ClientError
from clawgate.testing import GatewayProcess, free_port
from clawgate.testing.redis import drop_redis_prefix

ROOT = Path(__file__).resolve().parent
ECHO_PASSES = 3  # the echo floor is the median of this many passes (measure_echo)


@dataclass
class Samples:
    accepted_ms: list[float] = field(default_factory=list)
    final_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    unavailable: int = 0
    unavailable_examples: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def start_gateway(state_dir: Path, sets: list[str], log: Path) -> GatewayProcess:
    """The gateway under test, healthy; `sets` are NAME=VALUE settings as on the command line."""
    args = ["--log-level", "warning"]
    for item in sets:
        args += ["--set", item]
    return GatewayProcess(state_dir, args=args, log_path=log).start(30)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def drive(
    url: str,
    *,
    runs: int,
    concurrency: int,
    connections: int,
    sessions: int,
    message: str,
    tag: str,
) -> tuple[Samples, float]:
    clients = [
        Client(url, keep_events=False, max_reconnect_attempts=3, client_id=f"bench-{i}")
        for i in range(connections)
    ]
    for client in clients:
        await client.connect()
    samples = Samples()
    counter = iter(range(runs))
    perf = time.perf_counter

    async def one(client: Client, i: int) -> None:
        key = f"agent:main:bench-{i % sessions}" if sessions else f"agent:main:bench-{tag}-{i}"
        params = {"message": message, "idempotencyKey": f"bench-{tag}-{i}", "sessionKey": key}
        accepted_at: list[float] = []

        def on_accepted(_payload: dict[str, Any]) -> None:
            accepted_at.append(perf())

        while True:
            accepted_at.clear()
            t0 = perf()
            try:
                final = await client.call_final("agent", params, on_accepted=on_accepted)
            except ClientError as exc:
                if exc.code == "UNAVAILABLE":
                    samples.unavailable += 1
                    if len(samples.unavailable_examples) < 3:
                        samples.unavailable_examples.append(exc.message[:200])
                    await asyncio.sleep((exc.retry_after_ms or 100) / 1000)
                    continue
                samples.errors.append(f"{exc.code}: {exc.message}")
                return
            t1 = perf()
            if accepted_at:
                samples.accepted_ms.append((accepted_at[0] - t0) * 1000)
            samples.final_ms.append((t1 - t0) * 1000)
            status = str(final.get("status"))
            samples.statuses[status] = samples.statuses.get(status, 0) + 1
            return

    async def worker(client: Client) -> None:
        for i in counter:
            await one(client, i)

    started = perf()
    await asyncio.gather(*(worker(clients[w % connections]) for w in range(concurrency)))
    wall = perf() - started
    for client in clients:
        await client.close()
    return samples, wall


async def drive_echo(url: str, *, calls: int, concurrency: int, connections: int) -> float:
    """Round trips through the bare echo server with the same client; returns the wall time."""
    clients = [Client(url, keep_events=False, max_reconnect_attempts=3) for _ in range(connections)]
    for client in clients:
        await client.connect()
    counter = iter(range(calls))
    params = {"message": "benchmark run", "idempotencyKey": "bench-echo", "sessionKey": "agent:main:x"}

    async def worker(client: Client) -> None:
        for _ in counter:
            await client.call("echo", params)

    started = time.perf_counter()
    await asyncio.gather(*(worker(clients[w % connections]) for w in range(concurrency)))
    wall = time.perf_counter() - started
    for client in clients:
        await client.close()
    return wall


def measure_echo(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "echo_server.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready"
        server = psutil.Process(proc.pid)
        url = f"ws://127.0.0.1:{port}/"
        kw = {"concurrency": args.concurrency, "connections": args.connections}
        if args.warmup:
            asyncio.run(drive_echo(url, calls=args.warmup, **kw))
        # The echo answers N round trips in about a second, the gateway N runs in ten or more:
        # a single pass would be a one-second sample of a machine whose speed moves. The median
        # of ECHO_PASSES passes is the figure; every pass is reported.
        walls: list[float] = []
        cpus: list[float] = []
        for _ in range(ECHO_PASSES):
            cpu0 = cpu_s(server)
            walls.append(asyncio.run(drive_echo(url, calls=args.runs, **kw)))
            cpus.append(cpu_s(server) - cpu0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {
        "round_trips": args.runs,
        "passes": ECHO_PASSES,
        "wall_s": round(wall, 3),
        "round_trips_per_s": round(args.runs / wall, 1),
        "round_trips_per_s_each": [round(args.runs / w, 1) for w in walls],
        "server_cpu_s": round(cpu, 2),
        "server_cpu_us_per_round_trip": round(cpu / args.runs * 1e6, 1),
    }


def summarize(samples: Samples, wall: float, runs: int) -> dict[str, Any]:
    done = len(samples.final_ms)
    return {
        "runs": runs,
        "completed": done,
        "statuses": samples.statuses,
        "unavailable_retries": samples.unavailable,
        "unavailable_examples": samples.unavailable_examples,
        "errors": len(samples.errors),
        "error_examples": samples.errors[:5],
        "wall_s": round(wall, 3),
        "runs_per_s": round(done / wall, 1) if wall else 0.0,
        "accepted_ms": {
            "p50": round(pct(samples.accepted_ms, 50), 3),
            "p90": round(pct(samples.accepted_ms, 90), 3),
            "p99": round(pct(samples.accepted_ms, 99), 3),
            "max": round(max(samples.accepted_ms, default=float("nan")), 3),
            "mean": round(statistics.fmean(samples.accepted_ms), 3) if samples.accepted_ms else None,
        },
        "final_ms": {
            "p50": round(pct(samples.final_ms, 50), 3),
            "p90": round(pct(samples.final_ms, 90), 3),
            "p99": round(pct(samples.final_ms, 99), 3),
            "max": round(max(samples.final_ms, default=float("nan")), 3),
        },
    }


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def main_thread_cpu_s(proc: psutil.Process) -> float:
    """CPU of the process's main thread (the event loop), apart from the SQLite writer's."""
    for thread in proc.threads():
        if thread.id == proc.pid:
            return float(thread.user_time + thread.system_time)
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1_000, help="runs before measuring (not counted)")
    parser.add_argument(
        "--sessions", type=int, default=0, help="session pool size (0: every run in its own session)"
    )
    parser.add_argument("--message", default="benchmark run")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="gateway setting NAME=VALUE (repeatable)"
    )
    parser.add_argument("--url", default=None, help="use this running gateway instead of starting one")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "runs_throughput.json")
    parser.add_argument("--keep-state", action="store_true", help="keep the temporary state dir")
    parser.add_argument(
        "--echo", action="store_true", help="also measure the bare echo server with the same client"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="record a py-spy flame graph of the measured part here"
    )
    args = parser.parse_args()

    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_name = "asyncio"

    tmp = Path(tempfile.mkdtemp(prefix="clawgate-bench-"))
    # On Redis, a private key prefix dropped at the end (a run's keys live for days there);
    # a prefix given with --set is left alone.
    sets = parse_sets(args.sets)
    redis_url = sets.get("store")
    own_prefix: str | None = None
    if args.url is None and isinstance(redis_url, str) and redis_url.startswith("redis"):
        if "redis_prefix" not in sets:
            own_prefix = f"cgbench{uuid.uuid4().hex[:8]}"
            args.sets.append(f"redis_prefix={own_prefix}")
        else:
            print(f"note: the keys under redis_prefix={sets['redis_prefix']} stay in Redis")
    gateway: GatewayProcess | None = None
    gw: psutil.Process | None = None
    url = args.url
    if url is None:
        gateway = start_gateway(tmp / "state", args.sets, tmp / "gateway.log")
        gw = psutil.Process(gateway.pid)
        url = gateway.url
    me = psutil.Process()
    tag = uuid.uuid4().hex[:8]
    try:
        rss_before = gw.memory_info().rss if gw else None
        if args.warmup:
            asyncio.run(
                drive(
                    url,
                    runs=args.warmup,
                    concurrency=args.concurrency,
                    connections=args.connections,
                    sessions=args.sessions,
                    message=args.message,
                    tag=f"{tag}w",
                )
            )
        rss_after_warmup = gw.memory_info().rss if gw else None
        spy: subprocess.Popen[bytes] | None = None
        if args.profile is not None and gw is not None:
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            if not Path(py_spy).exists():
                sys.exit("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(gw.pid),
                    "-o",
                    str(args.profile),
                    "--rate",
                    "250",
                    "--gil",
                ]
                + (["--format", "raw"] if args.profile.suffix == ".txt" else []),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # let py-spy attach before the measured part
        gw_cpu0 = cpu_s(gw) if gw else 0.0
        gw_main0 = main_thread_cpu_s(gw) if gw else 0.0
        me_cpu0 = cpu_s(me)
        samples, wall = asyncio.run(
            drive(
                url,
                runs=args.runs,
                concurrency=args.concurrency,
                connections=args.connections,
                sessions=args.sessions,
                message=args.message,
                tag=tag,
            )
        )
        gw_cpu = (cpu_s(gw) - gw_cpu0) if gw else None
        gw_main = (main_thread_cpu_s(gw) - gw_main0) if gw else None
        me_cpu = cpu_s(me) - me_cpu0
        rss_after = gw.memory_info().rss if gw else None
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes the flame graph and exits
            spy.wait(timeout=60)
    finally:
        if gateway is not None:
            gateway.stop()
        if own_prefix is not None and isinstance(redis_url, str):
            asyncio.run(drop_redis_prefix(redis_url, own_prefix))
        if not args.keep_state:
            shutil.rmtree(tmp, ignore_errors=True)

    result = summarize(samples, wall, args.runs)
    result.update(
        {
            "concurrency": args.concurrency,
            "connections": args.connections,
            "warmup": args.warmup,
            "sessions": args.sessions or "one per run",
            "gateway_settings": args.sets,
            "loop": loop_name,
            "gateway_rss_bytes": {
                "before": rss_before,
                "after_warmup": rss_after_warmup,
                "after": rss_after,
            },
            "cpu_s": {
                "gateway": round(gw_cpu, 2) if gw_cpu is not None else None,
                "client": round(me_cpu, 2),
                "gateway_util": round(gw_cpu / wall, 2) if gw_cpu is not None and wall else None,
                "client_util": round(me_cpu / wall, 2) if wall else None,
                "gateway_us_per_run": round(gw_cpu / len(samples.final_ms) * 1e6, 1)
                if gw_cpu is not None and samples.final_ms
                else None,
                "gateway_loop_thread_us_per_run": round(gw_main / len(samples.final_ms) * 1e6, 1)
                if gw_main is not None and samples.final_ms
                else None,
            },
            "load_avg_at_end": os.getloadavg(),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "targets": {"runs_per_s": 1000, "p99_accepted_ms": 20},
        }
    )
    if args.echo:
        echo = measure_echo(args)
        result["echo"] = echo
        result["echo_ratio"] = round(result["runs_per_s"] / echo["round_trips_per_s"], 3)
    result["meets_targets"] = bool(
        result["runs_per_s"] >= 1000 and result["accepted_ms"]["p99"] < 20 and result["errors"] == 0
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    mb = 1024 * 1024
    rss = result["gateway_rss_bytes"]
    print(f"runs        {result['completed']:,} / {args.runs:,} ok={samples.statuses.get('ok', 0):,}", end="")
    print(f" errors={result['errors']} unavailable-retries={samples.unavailable}")
    print(f"concurrency {args.concurrency} over {args.connections} connections ({loop_name})")
    print(f"throughput  {result['runs_per_s']:,.1f} runs/s  (wall {wall:.2f} s)")
    a, f = result["accepted_ms"], result["final_ms"]
    print(f"accepted    p50 {a['p50']:.2f} ms   p99 {a['p99']:.2f} ms   max {a['max']:.2f} ms")
    print(f"final       p50 {f['p50']:.2f} ms   p99 {f['p99']:.2f} ms   max {f['max']:.2f} ms")
    if rss["before"] is not None:
        print(
            f"gateway RSS before {rss['before'] / mb:.1f} MB, after warmup {rss['after_warmup'] / mb:.1f} MB, "
            f"after {rss['after'] / mb:.1f} MB"
        )
    cpu = result["cpu_s"]
    print(
        f"cpu         gateway {cpu['gateway']} s ({cpu['gateway_util']}), client {cpu['client']} s ({cpu['client_util']})"
    )
    print(
        f"cpu/run     gateway {cpu['gateway_us_per_run']} us "
        f"(event-loop thread {cpu['gateway_loop_thread_us_per_run']} us)"
    )
    print(f"load avg    {os.getloadavg()}")
    if args.echo:
        echo = result["echo"]
        print(
            f"echo        {echo['round_trips_per_s']:,.1f} round trips/s (median of "
            f"{', '.join(f'{x:,.0f}' for x in echo['round_trips_per_s_each'])}), server "
            f"{echo['server_cpu_us_per_round_trip']} us each; echo ratio {result['echo_ratio']}"
        )
    print(
        f"targets     >= 1000 runs/s and p99 accepted < 20 ms: {'MET' if result['meets_targets'] else 'NOT MET'}"
    )
    print(f"json        {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
