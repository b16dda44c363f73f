"""`clawgate bench soak`: the command; the engine is `clawgate.bench.soak`."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from clawgate.cli.app import Group


@click.group("bench", cls=Group, no_args_is_help=True)
def bench_app() -> None:
    """Benchmarks: soak (bounded memory under a long batch)."""


@bench_app.command()
@click.option("-n", "--runs", "n", type=int, default=100_000, help="Number of spawns.")
@click.option("--mode", default="session", help="Subagent mode: run or session.")
@click.option("--cleanup", default="keep", help="keep or delete.")
@click.option("--concurrency", type=int, default=128, help="Spawns in flight.")
@click.option("--url", help="Target a running gateway instead of starting one.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/out"),
    help="Output directory for soak.json and soak.png.",
)
@click.option("--ttl-wait", type=float, default=10.0, help="Seconds to wait after the batch.")
@click.option(
    "--workload", default="spawn", help="spawn (subagent spawns) or agent (runs, one session each)."
)
@click.option("--rate", type=float, default=0.0, help="Start at most this many runs per second (0: no cap).")
def soak(
    n: int,
    mode: str,
    cleanup: str,
    concurrency: int,
    url: str | None,
    out: Path,
    ttl_wait: float,
    workload: str,
    rate: float,
) -> None:
    """Drive N runs with compressed TTLs; sample RSS, state and disk; write soak.json and soak.png."""
    from rich.console import Console

    from clawgate.bench.soak import (
        run_soak,
        start_soak_gateway,
        stop_soak_gateway,
        verdict,
        wait_reachable,
        write_outputs,
    )

    if mode not in ("run", "session") or cleanup not in ("keep", "delete"):
        raise click.BadParameter("--mode must be run|session and --cleanup keep|delete")
    if workload not in ("spawn", "agent"):
        raise click.BadParameter("--workload must be spawn|agent")
    console = Console()
    gateway = None
    tmp = None
    try:
        if url is None:
            tmp = tempfile.TemporaryDirectory(prefix="clawgate-soak-")
            gateway = start_soak_gateway(Path(tmp.name))
            url = gateway.url
        else:
            _run_uvloop(wait_reachable(url))
        what = (
            "agent runs (one session each)"
            if workload == "agent"
            else f"{mode}-mode spawns (cleanup {cleanup})"
        )
        pid = gateway.proc.pid if gateway is not None and gateway.proc is not None else "external"
        console.print(f"soak: {n:,} {what} at concurrency {concurrency} against {url} (pid {pid})")
        result = _run_uvloop(
            run_soak(
                url, n, mode, cleanup, concurrency, ttl_wait, workload=workload, rate=rate, console=console
            )
        )
    finally:
        if gateway is not None:
            stop_soak_gateway(gateway)
        if tmp is not None:
            tmp.cleanup()
    json_path, png_path = write_outputs(result, out)
    ok, line = verdict(result)
    console.print(line)
    console.print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    sys.exit(0 if ok else 1)


def _run_uvloop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
