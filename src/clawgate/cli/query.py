"""`clawgate status` and `clawgate call`: ask a running gateway."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from clawgate.cli.app import (
    DEFAULT_URL,
    TokenFileOpt,
    TokenOpt,
    UrlOpt,
    call_or_exit,
    client_token,
    console,
    warn_if_token_on_command_line,
)


def status(
    ctx: typer.Context,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
) -> None:
    """Show the gateway's status: runs, connections, memory and every bounded structure's size."""
    warn_if_token_on_command_line(ctx)
    data = call_or_exit(url, client_token(token, token_file), "status", {})
    if as_json:
        console.print_json(data=data)
        return
    from clawgate.cli.render import bounded_state_table, status_table

    console.print(status_table(data, url))
    console.print(bounded_state_table(data))


def call(
    ctx: typer.Context,
    method: Annotated[str, typer.Argument(help="Method name, e.g. health, status, agent, sessions.list.")],
    params: Annotated[str, typer.Option("--params", help="Params as a JSON object.")] = "{}",
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    expect_final: Annotated[
        bool, typer.Option("--expect-final", help="Wait for the final answer (agent).")
    ] = False,
) -> None:
    """Send one RPC and print its answer as JSON (asking only for the scope the method needs)."""
    warn_if_token_on_command_line(ctx)
    token = client_token(token, token_file)
    try:
        parsed = json.loads(params)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--params is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("--params must be a JSON object")
    if method == "agent" and "idempotencyKey" not in parsed:
        parsed["idempotencyKey"] = os.urandom(8).hex()
    console.print_json(data=call_or_exit(url, token, method, parsed, final=expect_final))
