"""Redis commands per run of one gateway process on the Redis store, by command name.

Starts one gateway on `--store redis://...` with a private key prefix, drives N runs
(one session each, 64 in flight), and meanwhile reads Redis `MONITOR`, counting the
commands that mention the prefix (keys and pub/sub channels carry it, so commands of
other Redis users are left out). A pipeline or a script is several entries in
MONITOR (a script's inner calls are listed too, marked `lua`): both the client
round trips (commands the gateway sent) and the inner calls are reported.

    .venv/bin/python benchmarks/redis_commands.py --runs 500

MONITOR slows Redis down: use it to count, not to time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clawgate.testing.redis import drop_redis_prefix
from runs_throughput import drive, start_gateway

ROOT = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "redis_commands.json")
    args = parser.parse_args()
    prefix = f"cgbench{uuid.uuid4().hex[:8]}:"
    tmp = Path(tempfile.mkdtemp(prefix="clawgate-rcmd-"))
    gateway = start_gateway(
        tmp / "state",
        [f"store={args.redis}", f"redis_prefix={prefix}", "main_concurrency=64"],
        tmp / "gateway.log",
    )
    url = gateway.url
    client_calls: Counter[str] = Counter()
    script_calls: Counter[str] = Counter()
    stop = False

    def monitor() -> None:
        r = redis.Redis.from_url(args.redis)
        with r.monitor() as m:
            for entry in m.listen():
                if stop:
                    return
                command = str(entry.get("command", ""))
                if prefix not in command:
                    continue
                name = command.split(" ", 1)[0].upper()
                if entry.get("client_type") == "lua":
                    script_calls[name] += 1
                else:
                    client_calls[name] += 1

    import threading

    try:
        asyncio.run(drive(url, runs=200, concurrency=64, connections=2, sessions=0, message="warm", tag="w"))
        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        import time

        time.sleep(0.5)
        asyncio.run(
            drive(url, runs=args.runs, concurrency=64, connections=2, sessions=0, message="count", tag="c")
        )
        time.sleep(1.0)
        stop = True
    finally:
        gateway.stop()
        redis.Redis.from_url(args.redis).ping()  # one command, so the monitor loop sees `stop`
        asyncio.run(drop_redis_prefix(args.redis, prefix))  # the run's keys live for days
    per_run = {k: round(v / args.runs, 2) for k, v in client_calls.most_common()}
    inner = {k: round(v / args.runs, 2) for k, v in script_calls.most_common()}
    result = {
        "runs": args.runs,
        "client_commands_per_run": round(sum(client_calls.values()) / args.runs, 2),
        "by_command": per_run,
        "script_inner_calls_per_run": round(sum(script_calls.values()) / args.runs, 2),
        "script_inner_by_command": inner,
        "load_avg": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"commands sent by the gateway per run: {result['client_commands_per_run']}")
    for name, n in per_run.items():
        print(f"  {name:<14} {n}")
    print(f"calls inside scripts per run: {result['script_inner_calls_per_run']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
