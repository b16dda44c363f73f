"""`python -m clawgate.cli.demo` (`make demo`): a batch of 200 tasks through an embedded gateway.

It starts a gateway in this process (SQLite store in a fresh temporary state
directory, removed at exit, so every demo starts from nothing; a free port on
127.0.0.1), runs the bundled `clawgate/examples/tasks.jsonl` through the same
code as `clawgate batch` (plain runs, streamed `[[chunks:4]]` runs, a few
session-mode subagent spawns, and one deliberate `[[error:...]]`), then prints
the batch summary, runs/s and the gateway's `status.state` table: every
per-run structure is back to empty once the batch is done.

Exit code 0 when the demo went as scripted (every task but the deliberate
error ended ok), 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from clawgate.batch.runner import BatchOptions, BatchSummary, run_batch
from clawgate.cli.app import run_async
from clawgate.cli.render import batch_summary_table, bounded_state_table
from clawgate.client import Client
from clawgate.server.serve import embedded_gateway

EXPECTED_ERRORS = 1  # the example file holds one deliberate [[error:...]] task


def example_tasks() -> Path:
    return Path(str(resources.files("clawgate") / "examples" / "tasks.jsonl"))


async def demo(console: Console) -> int:
    tasks = example_tasks()
    with tempfile.TemporaryDirectory(prefix="clawgate-demo-") as tmp:
        state_dir = Path(tmp) / "state"
        out = Path(tmp) / "results.jsonl"
        console.rule("[bold]clawgate demo")
        console.print(f"tasks:     {tasks}")
        console.print(f"state dir: {state_dir} (temporary, removed at exit)")
        started = time.monotonic()
        async with embedded_gateway(state_dir, {"subagent_concurrency": 8}) as running:
            console.print(f"gateway:   {running.url} (embedded, store: {running.gateway.store.kind})")
            summary = await run_batch(
                tasks,
                url=running.url,
                out_path=out,
                options=BatchOptions(concurrency=32, connections=4),
                console=console,
            )
            async with Client(running.url, max_reconnect_attempts=0) as client:
                status = await _settled_status(client)
            samples = _samples(out)
        elapsed = time.monotonic() - started
    console.print(batch_summary_table(summary))
    console.print(
        f"[bold]{summary.completed}[/bold] runs completed in {summary.wall_s:.2f} s: "
        f"[bold]{summary.runs_per_s:,.0f} runs/s[/bold] (demo total {elapsed:.1f} s)"
    )
    for line in samples:
        console.print(f"  {line}")
    console.print(_status_table(status))
    return 0 if _as_scripted(summary) else 1


async def _settled_status(client: Client) -> dict[str, Any]:
    """`status` once no run is active or queued (bounded: the subagent pipelines finish quickly)."""
    status: dict[str, Any] = {}
    for _ in range(100):
        status = await client.status()
        if status["runs"]["active"] == 0 and status["runs"]["queued"] == 0:
            return status
        await asyncio.sleep(0.05)
    return status


def _samples(out: Path) -> list[str]:
    picked: dict[str, str] = {}
    with open(out, encoding="utf-8") as fh:
        for raw in fh:
            line = json.loads(raw)
            kind = (
                "error"
                if line["status"] != "ok"
                else ("agent" if str(line["runId"]).startswith("batch:") else "spawn")
            )
            if kind not in picked:
                shown = line["text"] if line["status"] == "ok" else line["error"]
                picked[kind] = f"{kind:5} {line['id']}: {line['status']}: {shown!r}"
    return list(picked.values())


def _status_table(status: dict[str, Any]) -> Table:
    runs = status["runs"]
    table = bounded_state_table(status, title="gateway status.state (entries per bounded structure)")
    table.add_section()
    table.add_row("runs completed", str(runs["completed"]))
    for name, count in sorted(runs.get("byStatus", {}).items()):
        table.add_row(f"  {name}", str(count))
    table.add_row("RSS", f"{status['memory']['rssBytes'] / 1e6:.1f} MB")
    return table


def _as_scripted(summary: BatchSummary) -> bool:
    return (
        summary.invalid == 0
        and summary.unfinished == 0
        and summary.error == EXPECTED_ERRORS
        and summary.ok == summary.tasks - EXPECTED_ERRORS
    )


def main() -> None:
    code = run_async(demo(Console()))
    sys.exit(code)


if __name__ == "__main__":
    main()
