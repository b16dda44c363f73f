"""Provider faults, end to end: runs through a gateway process while the (scripted) provider
rate-limits, is overloaded, has a model down (fallback), or drops streams halfway.

For each scenario it sends N `agent` runs at concurrency C, follows every run's events on a
second connection (`events.subscribe all`), and counts: runs accepted, runs ended (a final
answer), runs lost (accepted but no final answer), duplicated ends (more than one lifecycle
end/error without `willRetry` for a run), and the final statuses. Prints a table and writes JSON.

    .venv/bin/python benchmarks/faults.py                # N=200 per scenario
    .venv/bin/python benchmarks/faults.py --runs 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from clawgate.client import Client
from clawgate.testing import GatewayProcess

ROOT = Path(__file__).resolve().parent

SCENARIOS: list[dict[str, Any]] = [
    {
        "name": "429 storm, Retry-After 0.2 s (3 failures per run)",
        "message": "[[fail:3:429]] [[retry-after:0.2]] [[reply:ok]]",
        "settings": {"provider_breaker_failures": 100000},
    },
    {
        "name": "529 overloaded, backoff only (2 failures per run)",
        "message": "[[fail:2:529]] [[reply:ok]]",
        "settings": {"provider_breaker_failures": 100000},
    },
    {
        "name": "primary model down, fallback model serves",
        "message": "[[fail-model:scripted]] [[reply:ok]]",
        "settings": {"fallback_models": '["backup"]', "provider_breaker_failures": 5},
    },
    {
        "name": "stream cut after 2 of 4 chunks",
        "message": "[[reply:aaaa bbbb cccc dddd]] [[chunks:4]] [[cut:2]]",
        "settings": {},
    },
]


async def scenario(spec: dict[str, Any], runs: int, concurrency: int, tmp: Path) -> dict[str, Any]:
    settings = {
        "provider_retry_base_s": 0.05,
        "provider_retry_max_delay_s": 1,
        "main_concurrency": 64,
        **spec["settings"],
    }
    gw = GatewayProcess(tmp / spec["name"][:8].replace(" ", "_"), settings=settings)
    await gw.astart()
    ends: Counter[str] = Counter()
    try:
        async with (
            Client(gw.url, max_reconnect_attempts=0) as watcher,
            Client(gw.url, max_reconnect_attempts=0) as c,
        ):

            def on_event(frame: dict[str, Any]) -> None:
                p = frame.get("payload") or {}
                if frame.get("event") == "agent" and p.get("stream") == "lifecycle":
                    d = p.get("data") or {}
                    if d.get("phase") in ("end", "error") and not d.get("willRetry"):
                        ends[p["runId"]] += 1

            watcher.on_event = on_event
            await watcher.call("events.subscribe", {"all": True})
            accepted: set[str] = set()
            finals: dict[str, str] = {}
            sem = asyncio.Semaphore(concurrency)
            started = time.monotonic()

            async def one(i: int) -> None:
                run_id = f"f{i}"
                async with sem:
                    final = await c.run_agent(
                        spec["message"],
                        session_key=f"agent:main:f{i}",
                        idempotency_key=run_id,
                        on_accepted=lambda _p: accepted.add(run_id),
                        timeout=120,
                    )
                    finals[run_id] = final["status"]

            results = await asyncio.gather(*(one(i) for i in range(runs)), return_exceptions=True)
            wall = time.monotonic() - started
            await asyncio.sleep(0.5)  # let the last lifecycle events reach the watcher
            status = await c.call("status")
    finally:
        gw.stop()
    return {
        "scenario": spec["name"],
        "runs": runs,
        "accepted": len(accepted),
        "ended": len(finals),
        "lost": len(accepted - set(finals)),
        "duplicatedEnds": sum(1 for n in ends.values() if n > 1),
        "statuses": dict(Counter(finals.values())),
        "clientErrors": sum(1 for r in results if isinstance(r, BaseException)),
        "providerErrors": status["provider"]["errors"],
        "providerRetries": status["provider"]["retries"],
        "fallbacksUsed": status["provider"].get("fallbacksUsed", 0),
        "wallS": round(wall, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "faults.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in SCENARIOS:
            rows.append(await scenario(spec, args.runs, args.concurrency, Path(tmp)))
    header = "| fault | runs accepted | runs ended | lost | duplicated ends | statuses | provider errors / retries | wall |"
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        print(
            f"| {r['scenario']} | {r['accepted']} | {r['ended']} | {r['lost']} | {r['duplicatedEnds']} | "
            f"{r['statuses']} | {r['providerErrors']} / {r['providerRetries']} | {r['wallS']} s |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
