"""The soak engine: drive a long batch against a gateway and watch memory and disk stay flat.

`run_soak` drives N subagent spawns (or, with `workload="agent"`, N agent runs each in a
session of its own) at a fixed concurrency, samples the gateway's RSS, `status.state` and
`status.disk` (store bytes and rows per table) every second, and returns a `SoakResult`;
`write_outputs` writes `soak.json` and `soak.png` (RSS, tracked entries, store bytes and
rows against runs completed, with the TTL sweeps and retention passes visible); `verdict`
judges it. `start_soak_gateway` starts the gateway process with `SOAK_SETTINGS` (compressed
TTLs) through `clawgate.testing.process`. `clawgate bench soak` is the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from clawgate.testing.process import GatewayProcess

# Compressed TTLs for the soak: every per-run structure must empty within one of these.
SOAK_SETTINGS = {
    "subagent_session_ttl_s": 3.0,
    "subagent_archive_after_s": 3.0,
    "run_result_ttl_s": 3.0,
    "dedupe_ttl_s": 3.0,
    "run_context_idle_ttl_s": 6.0,
    "pending_error_ttl_s": 6.0,
    "maintenance_interval_s": 1.0,
    "max_children_per_agent": 1000,
    "subagent_concurrency": 64,
    "lifecycle_error_grace_s": 0.5,
    # Retention of what is on disk, compressed the same way (docs/disk.md).
    "session_idle_ttl_s": 6.0,
    "run_retention_s": 3.0,
    # The 500 requester sessions get an announcement per spawn and are never idle: their
    # transcripts grow to this bound and are trimmed there (with the default of 500 they would
    # grow for 250,000 spawns, longer than a soak, and the disk criterion could not judge).
    "session_max_messages": 10,
    "disk_sample_interval_s": 1.0,
}
DISK_GROWTH_MAX = 0.10  # store bytes at the end at most 10% above bytes at 10% of the batch (window_median)


@dataclass
class Sample:
    t: float
    completed: int
    rss: int
    entries: int
    state: dict[str, int]
    stored: int
    store_bytes: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    store_bytes_after_pass: int = 0


@dataclass
class SoakResult:
    n: int
    mode: str
    cleanup: str
    concurrency: int
    wall_s: float = 0.0
    completed: int = 0
    errors: int = 0
    samples: list[Sample] = field(default_factory=list)
    rss_at_10pct: int = 0
    rss_end: int = 0
    rss_after_ttl: int = 0
    entries_after_ttl: dict[str, int] = field(default_factory=dict)
    stored_after_ttl: int = 0
    baseline: dict[str, int] = field(default_factory=dict)
    workload: str = "spawn"
    store_bytes_at_10pct: int = 0
    store_bytes_end: int = 0
    store_bytes_after_ttl: int = 0
    rows_baseline: dict[str, int] = field(default_factory=dict)
    rows_after_ttl: dict[str, int] = field(default_factory=dict)


def _entries(state: dict[str, int]) -> int:
    # Connection-keyed structures are not per-run; everything else counts.
    skip = {"connections", "event_sinks", "all_subscribers", "session_cache"}
    return sum(v for k, v in state.items() if k not in skip)


async def run_soak(
    url: str,
    n: int,
    mode: str,
    cleanup: str,
    concurrency: int,
    ttl_wait_s: float,
    connections: int = 8,
    show_progress: bool = True,
    workload: str = "spawn",
    rate: float = 0.0,
    console: Console | None = None,
) -> SoakResult:
    from clawgate.client import Client, ClientError

    result = SoakResult(n=n, mode=mode, cleanup=cleanup, concurrency=concurrency, workload=workload)
    clients = [Client(url, max_reconnect_attempts=3) for _ in range(connections)]
    monitor = Client(url, max_reconnect_attempts=3)
    for c in [*clients, monitor]:
        await c.connect()
    base = await monitor.status()
    result.baseline = base["state"]
    result.rows_baseline = _disk(base)[1]
    counter = iter(range(n))
    completed = 0
    errors = 0
    start = time.monotonic()
    stop_sampling = asyncio.Event()

    async def sample_loop() -> None:
        while not stop_sampling.is_set():
            st = await monitor.status()
            result.samples.append(
                Sample(
                    time.monotonic() - start,
                    completed,
                    st["memory"]["rssBytes"],
                    _entries(st["state"]),
                    st["state"],
                    st.get("stored", {}).get("subagent_records", 0),
                    *_disk(st),
                )
            )
            if completed >= n // 10 and not result.rss_at_10pct:
                result.rss_at_10pct = st["memory"]["rssBytes"]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), 1.0)

    progress = Progress(
        TextColumn("soak"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console or Console(),
        disable=not show_progress,
    )
    task_id = progress.add_task("spawns", total=n, rate="")

    async def worker(wid: int) -> None:
        nonlocal completed, errors
        client = clients[wid % len(clients)]
        for i in counter:
            if rate:
                # A fixed schedule: the steady state (rows, bytes) does not swing with bursts.
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            requester = f"agent:main:soak{i % 500}"
            while True:
                try:
                    if workload == "agent":
                        # A batch task without a session key of its own: one session per run.
                        final = await client.run_agent(
                            f"soak task {i} [[reply:done {i}]]", session_key=f"agent:main:soak-{i}"
                        )
                    else:
                        res = await client.spawn(
                            requester, f"soak task {i} [[reply:done {i}]]", mode=mode, cleanup=cleanup
                        )
                        final = await client.wait(res["runId"], 60_000)
                    if final.get("status") != "ok":
                        errors += 1
                    break
                except ClientError as exc:
                    if not exc.retryable:
                        errors += 1
                        break
                    await asyncio.sleep((exc.retry_after_ms or 200) / 1000)
            completed += 1
            if completed % 200 == 0:
                elapsed = time.monotonic() - start
                progress.update(task_id, completed=completed, rate=f"{completed / elapsed:,.0f}/s")

    sampler = asyncio.create_task(sample_loop())
    with progress:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        progress.update(task_id, completed=completed)
    result.wall_s = time.monotonic() - start
    result.completed = completed
    result.errors = errors
    end = await monitor.status()
    result.rss_end = end["memory"]["rssBytes"]
    # Let one TTL (plus sweep intervals) pass, sampling all the while, so the sweeps show on the plot.
    await asyncio.sleep(ttl_wait_s)
    stop_sampling.set()
    await sampler
    after = await monitor.status()
    result.rss_after_ttl = after["memory"]["rssBytes"]
    result.entries_after_ttl = after["state"]
    result.stored_after_ttl = after.get("stored", {}).get("subagent_records", 0)
    result.store_bytes_after_ttl, result.rows_after_ttl, _ = _disk(after)
    # Warm-up is over at 5% of the batch; compare the 5-10% window with the last 10%.
    result.store_bytes_at_10pct = window_median(result, 0.05, 0.10)
    result.store_bytes_end = window_median(result, 0.90, 1.0)
    for c in [*clients, monitor]:
        await c.close()
    if not result.rss_at_10pct:
        result.rss_at_10pct = result.samples[0].rss if result.samples else result.rss_end
    return result


def _disk(status: dict[str, Any]) -> tuple[int, dict[str, int], int]:
    """(store bytes, rows per table, store bytes after the last retention pass) from a status
    answer (zeros from a gateway without them)."""
    disk = status.get("disk") or {}
    return int(disk.get("storeBytes", 0)), dict(disk.get("rows", {})), int(disk.get("storeBytesAfterPass", 0))


def window_median(result: SoakResult, lo: float, hi: float) -> int:
    """The median store size after a retention pass among samples taken while the batch was
    between `lo` and `hi` (fractions of N) done. A pass whose checkpoint could not truncate
    the WAL (a writer was busy) reads a few MB high once; the median is what the file holds."""
    vals = [s.store_bytes_after_pass for s in result.samples if lo * result.n <= s.completed <= hi * result.n]
    return int(statistics.median(vals)) if vals else 0


def disk_growth(result: SoakResult) -> float:
    """Store bytes at the end relative to bytes at 10% of the batch (0.05 = 5% more)."""
    if not result.store_bytes_at_10pct:
        # No pass measured in the early window (a batch too short to warm up): unverified.
        return 0.0 if not result.store_bytes_end else float("inf")
    return result.store_bytes_end / result.store_bytes_at_10pct - 1


def rows_left(result: SoakResult) -> dict[str, int]:
    """Rows per table above their baseline after one retention period."""
    return {
        k: v - result.rows_baseline.get(k, 0)
        for k, v in result.rows_after_ttl.items()
        if v > result.rows_baseline.get(k, 0)
    }


def leftover(result: SoakResult) -> dict[str, int]:
    """Per-run structures above their baseline after one TTL (connections excluded)."""
    skip = {"connections", "event_sinks", "all_subscribers", "session_cache"}
    return {
        k: v - result.baseline.get(k, 0)
        for k, v in result.entries_after_ttl.items()
        if k not in skip and v > result.baseline.get(k, 0)
    }


def write_outputs(result: SoakResult, out_dir: Path) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "soak.json"
    data = {
        "n": result.n,
        "mode": result.mode,
        "cleanup": result.cleanup,
        "concurrency": result.concurrency,
        "wall_s": result.wall_s,
        "completed": result.completed,
        "errors": result.errors,
        "runs_per_s": result.completed / result.wall_s if result.wall_s else 0,
        "rss_at_10pct": result.rss_at_10pct,
        "rss_end": result.rss_end,
        "rss_after_ttl": result.rss_after_ttl,
        "rss_growth_bytes": result.rss_end - result.rss_at_10pct,
        "entries_after_ttl": result.entries_after_ttl,
        "leftover_after_ttl": leftover(result),
        "stored_subagent_records_after_ttl": result.stored_after_ttl,
        "workload": result.workload,
        "store_bytes_at_10pct": result.store_bytes_at_10pct,
        "store_bytes_end": result.store_bytes_end,
        "store_bytes_after_ttl": result.store_bytes_after_ttl,
        "store_bytes_growth": disk_growth(result),
        "rows_baseline": result.rows_baseline,
        "rows_after_ttl": result.rows_after_ttl,
        "rows_left_after_ttl": rows_left(result),
        "samples": [s.__dict__ for s in result.samples],
    }
    json_path.write_text(json.dumps(data, indent=1))
    png_path: Path | None = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax4) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
        xs = [s.t for s in result.samples]
        ax1.plot(xs, [s.rss / 1e6 for s in result.samples], color="tab:red", label="gateway RSS (MB)")
        ax1.set_ylabel("RSS (MB)", color="tab:red")
        ax1.set_ylim(bottom=0)
        ax2 = ax1.twinx()
        ax2.plot(xs, [s.entries for s in result.samples], color="tab:blue", label="tracked entries")
        ax2.plot(
            xs,
            [s.stored for s in result.samples],
            color="tab:green",
            linestyle="--",
            label="stored subagent records",
        )
        ax2.set_ylabel("entries", color="tab:blue")
        ax3 = ax1.twiny()
        ax3.set_xlim(ax1.get_xlim())
        ticks = xs[:: max(1, len(xs) // 6)]
        ax3.set_xticks(ticks)
        ax3.set_xticklabels([f"{s.completed:,}" for s in result.samples[:: max(1, len(xs) // 6)]], fontsize=7)
        ax3.set_xlabel("runs completed")
        ax1.legend(
            [*ax1.get_lines(), *ax2.get_lines()],
            [ln.get_label() for ln in [*ax1.get_lines(), *ax2.get_lines()]],
            loc="upper left",
            fontsize=8,
        )
        _plot_disk(ax4, xs, result)
        what = (
            f"{result.completed:,} agent runs, one session each"
            if result.workload == "agent"
            else f"{result.completed:,} {result.mode}-mode spawns, cleanup {result.cleanup}"
        )
        fig.suptitle(f"clawgate soak: {what}", fontsize=10)
        fig.tight_layout()
        png_path = out_dir / "soak.png"
        fig.savefig(png_path, dpi=110)
        plt.close(fig)
    except ImportError:
        png_path = None
    return json_path, png_path


def _plot_disk(ax: Any, xs: list[float], result: SoakResult) -> None:
    """The disk series: store bytes and rows per table, next to the memory plot above."""
    ax.plot(
        xs, [s.store_bytes / 1e6 for s in result.samples], color="tab:purple", label="store with WAL (MB)"
    )
    ax.plot(
        xs,
        [s.store_bytes_after_pass / 1e6 for s in result.samples],
        color="tab:purple",
        linestyle="--",
        label="store after retention pass (MB)",
    )
    ax.set_xlabel("seconds")
    ax.set_ylabel("store (MB)", color="tab:purple")
    ax.set_ylim(bottom=0)
    rows_ax = ax.twinx()
    for table, color in (("sessions", "tab:orange"), ("messages", "tab:olive"), ("runs", "tab:cyan")):
        rows_ax.plot(
            xs,
            [s.rows.get(table, 0) for s in result.samples],
            color=color,
            linestyle=":",
            label=f"{table} rows",
        )
    rows_ax.set_ylabel("rows")
    lines = [*ax.get_lines(), *rows_ax.get_lines()]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)


def verdict(result: SoakResult) -> tuple[bool, str]:
    growth = (result.rss_end - result.rss_at_10pct) / 1e6
    left = leftover(result)
    disk = disk_growth(result)
    rows = rows_left(result)
    ok = (
        growth <= 20
        and not left
        and result.stored_after_ttl == 0
        and result.errors == 0
        and disk <= DISK_GROWTH_MAX
        and not rows
    )
    return ok, (
        f"{'PASS' if ok else 'FAIL'}: {result.completed:,} {result.workload}s in {result.wall_s:.1f} s "
        f"({result.completed / max(result.wall_s, 1e-9):,.0f}/s), errors {result.errors}; RSS growth "
        f"first 10% -> end {growth:+.1f} MB (target <= 20 MB); entries left after one TTL: "
        f"{sum(left.values())} {left or ''}; stored records left: {result.stored_after_ttl}; "
        f"store bytes after retention, 5-10% -> last 10% of the batch (median): "
        f"{result.store_bytes_at_10pct:,} -> {result.store_bytes_end:,} "
        f"({disk:+.1%}, target <= +{DISK_GROWTH_MAX:.0%}); rows left after one TTL: {rows or 0}"
    )


def start_soak_gateway(state_dir: Path, timeout_s: float = 30.0) -> GatewayProcess:
    """A gateway process with `SOAK_SETTINGS` on a free loopback port, healthy when returned.

    It inherits this process's environment (a soak measures the gateway as configured here);
    its log is `state_dir/gateway.log`."""
    gateway = GatewayProcess(
        state_dir,
        settings=SOAK_SETTINGS,
        args=["--log-level", "warning"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        log_path=state_dir / "gateway.log",
    )
    return gateway.start(timeout_s)


def stop_soak_gateway(gateway: GatewayProcess, timeout_s: float = 15.0) -> None:
    """SIGTERM and wait (the gateway drains and exits); killed when it does not stop in time."""
    with contextlib.suppress(AssertionError):
        gateway.stop(timeout_s)


async def wait_reachable(url: str, timeout_s: float = 30.0) -> None:
    """Wait until a gateway started elsewhere (`--url`) answers `health`."""
    from clawgate.client import Client, ClientError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with Client(url, max_reconnect_attempts=0) as c:
                await c.call("health")
                return
        except (ClientError, OSError):
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway at {url} did not become healthy")
