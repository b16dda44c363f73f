"""The tables the CLI prints (rich): gateway status, bounded state, a batch's summary.

Imported by the commands that print, when they run (rich stays out of `clawgate gateway`).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from clawgate.batch.runner import BatchSummary


def status_table(data: dict[str, Any], url: str) -> Table:
    """The `status` answer's headline: uptime, connections, runs, RSS, store, admission."""
    summary = Table(title=f"clawgate {data.get('version')} at {url}", show_header=False)
    summary.add_row("uptime", f"{data['uptimeMs'] / 1000:.1f} s")
    summary.add_row("connections", str(data["connections"]))
    runs = data["runs"]
    summary.add_row(
        "runs", f"active {runs['active']}, queued {runs['queued']}, completed {runs['completed']}"
    )
    summary.add_row("rss", f"{data['memory']['rssBytes'] / 1e6:.1f} MB")
    summary.add_row("store", data["store"]["kind"])
    summary.add_row(
        "admission", "open" if data["admission"]["open"] else f"closed: {data['admission']['reason']}"
    )
    return summary


def bounded_state_table(data: dict[str, Any], title: str = "bounded state") -> Table:
    """Entries per bounded structure (`status.state`), then the stored ones (`status.stored`)."""
    table = Table(title=title)
    table.add_column("structure")
    table.add_column("entries", justify="right")
    for name, size in sorted(data["state"].items()):
        table.add_row(name, str(size))
    for name, size in sorted(data.get("stored", {}).items()):
        table.add_row(f"{name} (store)", str(size))
    return table


def batch_summary_table(summary: BatchSummary, title: str = "batch summary") -> Table:
    s = summary
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("ok", s.ok),
        ("error", s.error),
        ("timeout", s.timeout),
        ("aborted", s.aborted),
        ("skipped (done before)", s.skipped),
        ("retried", s.retried),
        ("unfinished", s.unfinished),
        ("not submitted (token budget)", s.over_budget),
        ("malformed lines", s.invalid),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    table.add_row("tokens", f"{s.tokens:,}")
    table.add_row("cost", f"${s.cost_usd:.4f}" if s.cost_usd is not None else "n/a (no price for the model)")
    table.add_row("runs/s", f"{s.runs_per_s:,.1f}")
    table.add_row("wall time", f"{s.wall_s:.2f} s")
    return table
