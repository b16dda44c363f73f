"""`clawgate batch TASKS.jsonl`: the command; the engine is `clawgate.batch`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from clawgate.cli.app import (
    Argument,
    Command,
    client_token,
    parse_sets,
    run_async,
    token_file_option,
    token_option,
    url_option,
    warn_if_token_on_command_line,
)

BATCH_HELP = (
    "Run every task of TASKS (JSONL) through a gateway, with a progress bar, retries and resume.\n\n"
    'Each line: {"id": ..., "message": ..., "sessionKey"?: ..., "spawn"?: {"mode": "run"|"session", '
    '"cleanup": "keep"|"delete"}, "timeout"?: seconds}. A task without sessionKey runs in its own session '
    "(agent:main:batch:ID); a spawn task is spawned on behalf of sessionKey (default --requester).\n\n"
    "Without --url an embedded gateway is started in this process (SQLite store under --state-dir, "
    "default ~/.clawgate, on a free 127.0.0.1 port).\n\n"
    "Each task is done exactly once: its idempotency key is batch:ID, tasks with a final line in the "
    "results file are skipped, and a rerun after a crash picks up runs the gateway already accepted "
    "instead of submitting them again. UNAVAILABLE answers and lost connections are retried with backoff.\n\n"
    "Exit code: 0 when every task in the file ended ok (in this run or an earlier one); 1 when any task "
    "ended error, timeout or aborted, was left unfinished after --max-attempts, or a line was malformed "
    "(malformed lines are reported with their line number and skipped); 2 on bad arguments."
)


_PATH = click.Path(path_type=Path)
_AT_LEAST_1 = click.IntRange(min=1)


@click.command(cls=Command, help=BATCH_HELP)
@click.argument(
    "tasks",
    cls=Argument,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Tasks file (JSONL).",
)
@url_option(help="Gateway URL (default: an embedded gateway).", default=None)
@token_option
@token_file_option
@click.option("--concurrency", "-c", type=_AT_LEAST_1, default=16, help="Tasks in flight.")
@click.option("--connections", type=_AT_LEAST_1, default=4, help="WebSocket connections.")
@click.option("--out", "-o", type=_PATH, help="Results JSONL (default TASKS.results.jsonl).")
@click.option(
    "--max-attempts",
    type=_AT_LEAST_1,
    default=20,
    help="Attempts per task before it is left unfinished.",
)
@click.option(
    "--requester",
    default="agent:main:batch",
    help="Requester session of spawn tasks without sessionKey.",
)
@click.option("--state-dir", type=_PATH, help="Embedded gateway state dir (default ~/.clawgate).")
@click.option("--set", "set_", multiple=True, help="Embedded gateway setting NAME=VALUE (repeatable).")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option(
    "--budget-tokens",
    type=_AT_LEAST_1,
    help="Stop submitting tasks once finished ones used N tokens.",
)
@click.pass_context
def batch(
    ctx: click.Context,
    tasks: Path,
    url: str | None,
    token: str | None,
    token_file: Path | None,
    concurrency: int,
    connections: int,
    out: Path | None,
    max_attempts: int,
    requester: str,
    state_dir: Path | None,
    set_: Sequence[str],
    progress: bool,
    budget_tokens: int | None,
) -> None:
    from rich.console import Console

    from clawgate.batch.runner import BatchOptions, run_batch
    from clawgate.cli.render import batch_summary_table
    from clawgate.client import ClientError

    warn_if_token_on_command_line(ctx)
    token = client_token(token, token_file)
    console = Console()
    err = Console(stderr=True)
    sets = parse_sets(set_)
    options = BatchOptions(
        concurrency=concurrency,
        connections=connections,
        max_attempts=max_attempts,
        requester=requester,
        progress=progress,
        budget_tokens=budget_tokens,
    )

    async def main() -> Any:
        if url is not None:
            return await run_batch(tasks, url=url, token=token, out_path=out, options=options, console=err)
        from clawgate.server.serve import embedded_gateway

        async with embedded_gateway(state_dir, sets) as running:
            return await run_batch(
                tasks,
                url=running.url,
                token=running.gateway.settings.token,
                out_path=out,
                options=options,
                console=err,
            )

    try:
        summary = run_async(main())
    except ClientError as exc:
        err.print(f"[red]batch failed:[/red] {exc.code}: {exc.message}")
        sys.exit(1)
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("[yellow]interrupted: finished tasks are in the results file; rerun to resume[/yellow]")
        sys.exit(130)
    console.print(batch_summary_table(summary))
    console.print(f"results: {summary.out_path}")
    sys.exit(0 if summary.all_ok else 1)
