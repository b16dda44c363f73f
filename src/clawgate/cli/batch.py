"""`clawgate batch TASKS.jsonl`: the command; the engine is `clawgate.batch`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from clawgate.cli.app import (
    TokenFileOpt,
    TokenOpt,
    client_token,
    parse_sets,
    run_async,
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


def batch(
    ctx: typer.Context,
    tasks: Annotated[Path, typer.Argument(help="Tasks file (JSONL).", exists=True, dir_okay=False)],
    url: Annotated[
        str | None,
        typer.Option("--url", envvar="CLAWGATE_URL", help="Gateway URL (default: an embedded gateway)."),
    ] = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Tasks in flight.")] = 16,
    connections: Annotated[int, typer.Option("--connections", min=1, help="WebSocket connections.")] = 4,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Results JSONL (default TASKS.results.jsonl).")
    ] = None,
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", min=1, help="Attempts per task before it is left unfinished.")
    ] = 20,
    requester: Annotated[
        str, typer.Option("--requester", help="Requester session of spawn tasks without sessionKey.")
    ] = "agent:main:batch",
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="Embedded gateway state dir (default ~/.clawgate).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Embedded gateway setting NAME=VALUE (repeatable).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    budget_tokens: Annotated[
        int | None,
        typer.Option(
            "--budget-tokens", min=1, help="Stop submitting tasks once finished ones used N tokens."
        ),
    ] = None,
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
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("[yellow]interrupted: finished tasks are in the results file; rerun to resume[/yellow]")
        raise typer.Exit(130) from None
    console.print(batch_summary_table(summary))
    console.print(f"results: {summary.out_path}")
    raise typer.Exit(0 if summary.all_ok else 1)
