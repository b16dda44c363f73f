"""Sustained write rate of the SQLite store (its one writer thread with group commit).

The hot path of a run writes without awaiting: transcript appends and run-record
updates are enqueued, and the writer groups whatever it finds into one transaction.
This measures exactly that: N un-awaited writes (alternating `append_message` and
`put_run`, as a run does), then one barrier; the rate is N / (time until the barrier
resolved), so every write is committed when the clock stops.

    .venv/bin/python benchmarks/sqlite_writes.py --ops 100000
    .venv/bin/python benchmarks/sqlite_writes.py --ops 20000 --synchronous FULL --out /tmp/w.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from clawgate.store.records import RunRecord, TranscriptMessage
from clawgate.store.sqlite import SqliteStore

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "sqlite_writes.json"


async def measure(db: Path, ops: int, *, batch_max: int, synchronous: str, runs: int) -> dict[str, Any]:
    store = SqliteStore(db, batch_max=batch_max, synchronous=synchronous)
    await store.open()
    try:
        base = time.time()
        records = [
            RunRecord(
                run_id=f"bench-{i}",
                session_key=f"agent:main:bench-{i % 100}",
                agent_id="main",
                message="benchmark message",
                accepted_at=base,
            )
            for i in range(runs)
        ]
        expected_in_session_0 = 0
        started = time.perf_counter()
        for i in range(ops):
            rec = records[(i // 2) % runs]
            if i % 2 == 0:
                expected_in_session_0 += rec.session_key == "agent:main:bench-0"
                store.append_message(
                    TranscriptMessage(
                        session_key=rec.session_key,
                        role="user",
                        content=f"message {i}",
                        ts=base,
                        run_id=rec.run_id,
                    )
                )
            else:
                rec.status = "running" if rec.status == "queued" else "ok"
                store.put_run(rec)
        enqueued = time.perf_counter()
        await store.barrier()
        done = time.perf_counter()
        commits, stored_ops = store.commits, store.ops
        messages = len(await store.history("agent:main:bench-0", 1_000_000))
    finally:
        await store.close()
    # A rate is only worth something if the writes landed.
    if messages != expected_in_session_0:
        raise SystemExit(f"lost writes: {messages} messages in session 0, expected {expected_in_session_0}")
    elapsed = done - started
    return {
        "ops": ops,
        "seconds": round(elapsed, 4),
        "ops_per_s": round(ops / elapsed, 1),
        "enqueue_seconds": round(enqueued - started, 4),
        "commits": commits,
        "ops_per_commit": round(stored_ops / commits, 1) if commits else None,
        "batch_max": batch_max,
        "synchronous": synchronous,
        "messages_in_session_0": messages,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=100_000, help="writes to issue (default 100000)")
    parser.add_argument("--runs", type=int, default=1000, help="distinct run records updated (default 1000)")
    parser.add_argument("--batch-max", type=int, default=512, help="ops per transaction at most")
    parser.add_argument("--synchronous", choices=["OFF", "NORMAL", "FULL"], default="NORMAL")
    parser.add_argument("--db", type=Path, default=None, help="database file (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    args = parser.parse_args()
    if args.ops < 2 or args.runs < 1:
        parser.error("--ops must be >= 2 and --runs >= 1")

    with tempfile.TemporaryDirectory(prefix="clawgate-bench-") as tmp:
        db = args.db or Path(tmp) / "bench.db"
        result = asyncio.run(
            measure(db, args.ops, batch_max=args.batch_max, synchronous=args.synchronous, runs=args.runs)
        )
    print(
        f"sqlite writes: {result['ops']} ops in {result['seconds']:.3f} s = {result['ops_per_s']:,.0f} ops/s; "
        f"{result['commits']} commits ({result['ops_per_commit']} ops/commit), "
        f"synchronous={result['synchronous']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
