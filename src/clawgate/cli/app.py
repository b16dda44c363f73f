"""The `clawgate` Typer app and what its commands share: options, consoles, one call helper.

Importing this module (and every command module) stays cheap: `clawgate gateway` loads the
whole CLI, and rich, the client and the batch / bench engines are imported by the commands
that use them, when they run.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from clawgate import __version__
from clawgate.settings import DEFAULT_PORT

app = typer.Typer(
    name="clawgate",
    help="clawgate: an asyncio agent gateway with memory bounded by construction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """A rich Console made on first use: `clawgate gateway` prints nothing through it when all
    goes well, and importing rich costs the server start time and several MB of RSS."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return getattr(self._console, name)


console: Any = _LazyConsole()
err: Any = _LazyConsole(stderr=True)

DEFAULT_URL = f"ws://127.0.0.1:{DEFAULT_PORT}/"
UrlOpt = Annotated[str, typer.Option("--url", envvar="CLAWGATE_URL", help="Gateway WebSocket URL.")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="CLAWGATE_TOKEN", help="Gateway token (prefer CLAWGATE_TOKEN or --token-file)."
    ),
]
TokenFileOpt = Annotated[
    Path | None, typer.Option("--token-file", help="Read the gateway token from this file.")
]
READ_SCOPES = ["operator.read"]
CMDLINE_TOKEN_WARNING = (
    "[yellow]warning:[/yellow] --token on the command line is visible to every local user "
    "(/proc/PID/cmdline, ps); use CLAWGATE_TOKEN or --token-file"
)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set NAME=VALUE` flags as settings overrides (dashes in NAME read as underscores).

    Lists and tables (`fallback_models=["a","b"]`, `model_prices={...}`) are given as JSON;
    any other value is passed on as the string it is."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects NAME=VALUE, got {item!r}")
        key = name.strip().replace("-", "_")
        if value.lstrip().startswith(("[", "{")):
            try:
                out[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def warn_if_token_on_command_line(ctx: typer.Context) -> None:
    # Only a token typed on the command line: one from CLAWGATE_TOKEN is not visible to others.
    source = ctx.get_parameter_source("token")
    if source is not None and source.name == "COMMANDLINE":
        err.print(CMDLINE_TOKEN_WARNING)


def client_token(token: str | None, token_file: Path | None) -> str | None:
    if token_file is None:
        return token
    from clawgate.server.credentials import read_token_file

    try:
        return read_token_file(token_file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def scopes_for(method: str) -> list[str]:
    """The least a CLI call of `method` needs (the gateway refuses more than a token allows)."""
    from clawgate.methods.table import build_table

    spec = build_table().get(method)
    return [spec.scope] if spec is not None else READ_SCOPES


def install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install() if sys.version_info < (3, 12) else None
    except ImportError:
        pass


def run_async(coro: Any) -> Any:
    install_uvloop()
    return asyncio.run(coro)


async def _one_call(url: str, token: str | None, method: str, params: dict[str, Any], final: bool) -> Any:
    from clawgate.client import Client

    async with Client(url, token=token, max_reconnect_attempts=0, scopes=scopes_for(method)) as client:
        if final:
            return await client.call_final(method, params)
        return await client.call(method, params)


def call_or_exit(
    url: str, token: str | None, method: str, params: dict[str, Any], final: bool = False
) -> Any:
    """One RPC's answer; an error answer is printed as JSON on stderr and exits 1, as does an
    unreachable gateway."""
    from clawgate.client import ClientError

    try:
        return run_async(_one_call(url, token, method, params, final))
    except ClientError as exc:
        err.print_json(
            data={"ok": False, "error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        )
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]cannot reach {url}:[/red] {exc}")
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"clawgate {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """clawgate command line."""
