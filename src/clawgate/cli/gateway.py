"""`clawgate gateway`: serve the gateway in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from clawgate.cli.app import CMDLINE_TOKEN_WARNING, console, err, install_uvloop, parse_sets
from clawgate.settings import DEFAULT_PORT, load_settings


def gateway(
    port: Annotated[
        int | None, typer.Option("--port", help=f"Port to listen on (default {DEFAULT_PORT}).")
    ] = None,
    bind: Annotated[str | None, typer.Option("--bind", help="Address to bind (default 127.0.0.1).")] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="Token clients must present (visible to local users: prefer CLAWGATE_TOKEN)."
        ),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="Read the token clients must present from this file.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="State directory (default ~/.clawgate).")
    ] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="'sqlite' (default) or a redis:// URL.")
    ] = None,
    provider: Annotated[
        str | None, typer.Option("--provider", help="'scripted' (default) or 'openai'.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any setting: NAME=VALUE (repeatable).")
    ] = None,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log JSON lines instead of readable text.")
    ] = False,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning, error.")] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the effective settings and exit.")
    ] = False,
) -> None:
    """Serve the gateway (WebSocket RPC and HTTP /healthz /readyz /metrics) until SIGINT/SIGTERM."""
    from clawgate import logs
    from clawgate.server.credentials import exposure_problems, load_credentials, readable_by_others

    if token is not None:
        err.print(CMDLINE_TOKEN_WARNING)
    overrides: dict[str, Any] = dict(
        port=port,
        bind=bind,
        token=token,
        token_file=token_file,
        state_dir=state_dir,
        store=store,
        provider=provider,
        log_level=log_level,
    )
    if log_json:
        overrides["log_json"] = True
    overrides.update(parse_sets(set_))
    try:
        settings = load_settings(config, **overrides)
    except Exception as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    for path in readable_by_others(settings):
        err.print(f"[yellow]warning:[/yellow] token file {path} is readable by other users (chmod 600 it)")
    if print_config:
        console.print_json(data=settings.redacted())
        raise typer.Exit()
    try:
        credentials = load_credentials(settings)
    except ValueError as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    problems = exposure_problems(settings, credentials)
    if problems:
        for problem in problems:
            err.print(f"[red]{problem}[/red]")
        raise typer.Exit(2)
    logs.configure(settings.log_level, json=settings.log_json)
    from clawgate.server.fdlimit import FdLimitError, ensure_fd_limit
    from clawgate.server.gateway import Gateway, StateDirError
    from clawgate.server.serve import serve_forever

    try:
        # Refused here, before anything opens: a configuration that cannot hold under load.
        ensure_fd_limit(settings)
        gateway = Gateway(settings)
    except (FdLimitError, StateDirError) as exc:
        err.print(f"[red]refusing to start:[/red] {exc}")
        raise typer.Exit(2) from None
    install_uvloop()
    try:
        code = asyncio.run(serve_forever(gateway))
    except OSError as exc:
        err.print(f"[red]cannot listen on {settings.bind}:{settings.port}:[/red] {exc}")
        raise typer.Exit(1) from None
    raise typer.Exit(code)
