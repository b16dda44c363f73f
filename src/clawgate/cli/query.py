"""`clawgate status` and `clawgate call`: ask a running gateway."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from clawgate.cli.app import (
    Argument,
    Command,
    call_or_exit,
    client_token,
    console,
    token_file_option,
    token_option,
    url_option,
    warn_if_token_on_command_line,
)


@click.command()
@url_option()
@token_option
@token_file_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@click.pass_context
def status(ctx: click.Context, url: str, token: str | None, token_file: Path | None, as_json: bool) -> None:
    """Show the gateway's status: runs, connections, memory and every bounded structure's size."""
    warn_if_token_on_command_line(ctx)
    data = call_or_exit(url, client_token(token, token_file), "status", {})
    if as_json:
        console.print_json(data=data)
        return
    from clawgate.cli.render import bounded_state_table, status_table

    console.print(status_table(data, url))
    console.print(bounded_state_table(data))


@click.command(cls=Command)
@click.argument("method", cls=Argument, help="Method name, e.g. health, status, agent, sessions.list.")
@click.option("--params", default="{}", help="Params as a JSON object.")
@url_option()
@token_option
@token_file_option
@click.option("--expect-final", is_flag=True, help="Wait for the final answer (agent).")
@click.pass_context
def call(
    ctx: click.Context,
    method: str,
    params: str,
    url: str,
    token: str | None,
    token_file: Path | None,
    expect_final: bool,
) -> None:
    """Send one RPC and print its answer as JSON (asking only for the scope the method needs)."""
    warn_if_token_on_command_line(ctx)
    token = client_token(token, token_file)
    try:
        parsed = json.loads(params)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"--params is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("--params must be a JSON object")
    if method == "agent" and "idempotencyKey" not in parsed:
        parsed["idempotencyKey"] = os.urandom(8).hex()
    console.print_json(data=call_or_exit(url, token, method, parsed, final=expect_final))
