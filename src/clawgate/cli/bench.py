"""`clawgate bench soak`: the command; the engine is `clawgate.bench.soak`."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

bench_app = typer.Typer(help="Benchmarks: soak (bounded memory under a long batch).", no_args_is_help=True)


@bench_app.callback()
def bench_callback() -> None:
    """Benchmarks that print figures and write JSON."""


@bench_app.command()
def soak(
    n: Annotated[int, typer.Option("-n", "--runs", help="Number of spawns.")] = 100_000,
    mode: Annotated[str, typer.Option("--mode", help="Subagent mode: run or session.")] = "session",
    cleanup: Annotated[str, typer.Option("--cleanup", help="keep or delete.")] = "keep",
    concurrency: Annotated[int, typer.Option("--concurrency", help="Spawns in flight.")] = 128,
    url: Annotated[
        str | None, typer.Option("--url", help="Target a running gateway instead of starting one.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory for soak.json and soak.png.")] = Path(
        "benchmarks/out"
    ),
    ttl_wait: Annotated[float, typer.Option("--ttl-wait", help="Seconds to wait after the batch.")] = 10.0,
    workload: Annotated[
        str, typer.Option("--workload", help="spawn (subagent spawns) or agent (runs, one session each).")
    ] = "spawn",
    rate: Annotated[
        float, typer.Option("--rate", help="Start at most this many runs per second (0: no cap).")
    ] = 0.0,
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
        raise typer.BadParameter("--mode must be run|session and --cleanup keep|delete")
    if workload not in ("spawn", "agent"):
        raise typer.BadParameter("--workload must be spawn|agent")
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
    raise typer.Exit(0 if ok else 1)


def _run_uvloop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
