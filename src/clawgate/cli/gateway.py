"""`clawgate gateway`: serve the gateway in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from clawgate.cli.app import CMDLINE_TOKEN_WARNING, console, err, install_uvloop, parse_sets
from clawgate.settings import DEFAULT_PORT, load_settings

_PATH = click.Path(path_type=Path)


@click.command()
@click.option("--port", type=int, help=f"Port to listen on (default {DEFAULT_PORT}).")
@click.option("--bind", help="Address to bind (default 127.0.0.1).")
@click.option("--token", help="Token clients must present (visible to local users: prefer CLAWGATE_TOKEN).")
@click.option("--token-file", type=_PATH, help="Read the token clients must present from this file.")
@click.option("--state-dir", type=_PATH, help="State directory (default ~/.clawgate).")
@click.option("--store", help="'sqlite' (default) or a redis:// URL.")
@click.option("--provider", help="'scripted' (default) or 'openai'.")
@click.option("--config", type=_PATH, help="TOML settings file.")
@click.option("--set", "set_", multiple=True, help="Override any setting: NAME=VALUE (repeatable).")
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of readable text.")
@click.option("--log-level", help="debug, info, warning, error.")
@click.option("--print-config", is_flag=True, help="Print the effective settings and exit.")
def gateway(
    port: int | None,
    bind: str | None,
    token: str | None,
    token_file: Path | None,
    state_dir: Path | None,
    store: str | None,
    provider: str | None,
    config: Path | None,
    set_: Sequence[str],
    log_json: bool,
    log_level: str | None,
    print_config: bool,
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
        sys.exit(2)
    for path in readable_by_others(settings):
        err.print(f"[yellow]warning:[/yellow] token file {path} is readable by other users (chmod 600 it)")
    if print_config:
        console.print_json(data=settings.redacted())
        sys.exit(0)
    try:
        credentials = load_credentials(settings)
    except ValueError as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        sys.exit(2)
    problems = exposure_problems(settings, credentials)
    if problems:
        for problem in problems:
            err.print(f"[red]{problem}[/red]")
        sys.exit(2)
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
        sys.exit(2)
    install_uvloop()
    try:
        code = asyncio.run(serve_forever(gateway))
    except OSError as exc:
        err.print(f"[red]cannot listen on {settings.bind}:{settings.port}:[/red] {exc}")
        sys.exit(1)
    sys.exit(code)
