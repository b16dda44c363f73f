"""`clawgate bench ...`: the soak benchmark (memory under a long batch)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks: soak (bounded memory under a long batch).", no_args_is_help=True)


@bench_app.callback()
def bench_callback() -> None:
    """Benchmarks that print figures and write JSON."""
