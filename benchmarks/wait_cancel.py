"""Cost of cancelling many parked `agent.wait`s on one run.

A run's listeners used to be a list, and each cancelled wait left by `list.remove`:
cancelling N parked waits was O(N^2) and stalled the event loop for seconds at
N = 40,000. They are now a dict keyed by a handle (runs/waiters.py), so each
cancel is O(1). This parks N waits on one running run of an in-process gateway
(FakeClock, scripted provider, no sockets), cancels them all at once and times
how long the loop takes to process the cancellations; then checks that the run
keeps only its own listener and the waiter structures are back to 0.

The order matters for a list: cancelling the oldest wait first finds it at the
front, cancelling the newest first scans the whole list each time. `--order lifo`
(the default) is that worst case; `fifo` is the cheap one. Much of the remaining
time is asyncio's own cost of cancelling N tasks (and the garbage collector).

    .venv/bin/python benchmarks/wait_cancel.py --waits 40000
    .venv/bin/python benchmarks/wait_cancel.py --waits 10000 --order fifo --out /tmp/w.json
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

import structlog

from clawgate.ids import ConnId, RunId, SessionKey
from clawgate.runs.service import SubmitRequest
from clawgate.server.gateway import Gateway
from clawgate.settings import parse_settings
from clawgate.state.clock import FakeClock

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "wait_cancel.json"
CONNECTIONS = 50  # the parked waits are spread over this many (pretend) connections


async def measure(waits: int, order: str = "lifo") -> dict[str, Any]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    per_conn = -(-waits // CONNECTIONS)
    with tempfile.TemporaryDirectory() as tmp:
        settings = parse_settings(
            {
                "state_dir": str(Path(tmp) / "state"),
                "port": 0,
                "log_level": "error",
                "max_waiters_per_run": waits + 1,
                "max_waiters_per_connection": per_conn,
                "shutdown_grace_s": 0,
            }
        )
        gw = Gateway(settings, clock=FakeClock())
        await gw.start()
        try:
            run_id = RunId("bench-wait")
            run, _rec, _created = await gw.runs.submit(
                SubmitRequest(
                    run_id=run_id,
                    session_key=SessionKey("agent:main:bench"),
                    agent_id="main",
                    message="[[stall]]",
                    timeout_s=3600,
                )
            )
            assert run is not None
            while run.task is None:
                await asyncio.sleep(0.001)
            tasks = [
                asyncio.create_task(gw.runs.wait(run_id, 3600, owner=ConnId(f"c{i % CONNECTIONS}")))
                for i in range(waits)
            ]
            park_started = time.perf_counter()
            while len(run.listeners) < waits:
                await asyncio.sleep(0)
            park_s = time.perf_counter() - park_started
            started = time.perf_counter()
            for task in reversed(tasks) if order == "lifo" else tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            cancel_s = time.perf_counter() - started
            sizes = gw.registry.sizes()
            left = {
                "run_listeners": len(run.listeners),
                **{k: sizes[k] for k in ("run_waiters", "waiting_connections")},
            }
            gw.runs.abort(run_id)
        finally:
            await gw.stop()
    return {
        "waits": waits,
        "order": order,
        "park_s": round(park_s, 4),
        "cancel_all_s": round(cancel_s, 4),
        "cancel_per_wait_us": round(cancel_s / waits * 1e6, 2),
        "left_after_cancel": left,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waits", type=int, default=40_000)
    parser.add_argument(
        "--order", choices=("lifo", "fifo"), default="lifo", help="which waits are cancelled first"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = asyncio.run(measure(args.waits, args.order))
    print(
        f"{result['waits']} parked waits ({result['order']}): parked in {result['park_s']:.3f} s, "
        f"all cancelled in {result['cancel_all_s']:.3f} s ({result['cancel_per_wait_us']} us each); "
        f"left: {result['left_after_cancel']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
